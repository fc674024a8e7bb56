"""The README's example runs as written and does what its comments say."""
import jax.numpy as jnp

from conftest import REPO
from test_docs import python_blocks, run_page

from jaxprune import flops


def test_readme_example_prunes_to_half_the_flops_and_runs(capsys):
  readme = REPO / "README.md"
  assert len(python_blocks(readme)) == 1
  ns = run_page(readme, "README.md")
  model, variables, small, info = ns["model"], ns["variables"], ns["small"], ns["info"]
  shape = (32, 32, 3)
  full = flops.count(model, variables, shape)
  pruned = flops.count(small.model, small.variables, shape)
  # "the same": info's prediction is what the rebuilt network counts.
  assert info["after"]["flops"] == pruned["flops"]
  assert info["after"]["params"] == pruned["params"]
  # flops_ratio=0.5 is met from below.
  assert 0 < pruned["flops"] <= 0.5 * full["flops"]
  assert ns["logits"].shape == (4, 10)
  assert jnp.all(jnp.isfinite(ns["logits"]))
  scratch_kernel = ns["scratch"]["params"]["conv0"]["kernel"]
  assert scratch_kernel.shape == small.variables["params"]["conv0"]["kernel"].shape
  out = capsys.readouterr().out
  assert f"'flops': {full['flops']}" in out  # the printed comments are what runs
