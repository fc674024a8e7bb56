"""NNX models written for pmap (``nnx.BatchNorm(axis_name='batch')``) from the CLI: the
axis is bound to the global batch, as for Linen ones (tests/graph/test_real_models.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli
from jaxprune.errors import UserError
from jaxprune.graph import adapters
from jaxprune.models import external

NNX_PMAP_MODEL = '''
from flax import nnx


class Net(nnx.Module):
  """An NNX model written for pmap: BatchNorm statistics over the 'batch' axis."""

  def __init__(self, num_classes, axis_name, rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(6, momentum=0.5, axis_name=axis_name, rngs=rngs)
    self.conv2 = nnx.Conv(6, 6, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(6, momentum=0.5, axis_name=axis_name, rngs=rngs)
    self.head = nnx.Linear(6, num_classes, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x)))
    h = nnx.relu(self.bn2(self.conv2(h)))
    return self.head(h.mean((1, 2)))


def make(num_classes, rngs, axis_name="batch"):
  return Net(num_classes, axis_name, rngs)
'''


def test_nnx_pmap_model_gets_its_axis_bound_to_the_global_batch(tmp_path, monkeypatch):
  """FromNNX binds the axis name of an NNX model with BatchNorm(axis_name='batch'): a
  train step's logits and batch statistics equal those of the same model with plain
  BatchNorm over the whole batch; eval mode is unchanged."""
  (tmp_path / "nnx_pmap_t.py").write_text(NNX_PMAP_MODEL)
  monkeypatch.syspath_prepend(str(tmp_path))
  built = external.build("nnx_pmap_t:make", None, 5, (6, 6, 3))
  plain = external.build("nnx_pmap_t:make", {"axis_name": None}, 5, (6, 6, 3))
  assert isinstance(built, adapters.FromNNX) and isinstance(plain, adapters.FromNNX)
  assert adapters.unbound_axis_names(built.split.merge(built.split.pure)) == ("batch",)
  assert adapters.unbound_axis_names(plain.split.merge(plain.split.pure)) == ()

  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 3)), jnp.float32)
  variables = built.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(
      plain.init(jax.random.key(0), x, train=False))
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, np.shape(a)), a.dtype),
                           variables)
  variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
  got, got_stats = jax.jit(lambda v, x: built.apply(v, x, train=True,
                                                    mutable=["batch_stats"]))(variables, x)
  want, want_stats = plain.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_stats, want_stats)
  assert not np.allclose(got_stats["batch_stats"]["bn"]["mean"],
                         variables["batch_stats"]["bn"]["mean"])  # the step updated them
  np.testing.assert_allclose(built.apply(variables, x, train=False),
                             plain.apply(variables, x, train=False), rtol=1e-6)


@pytest.mark.e2e
def test_cli_prune_recipe_on_an_nnx_pmap_model(tmp_path):
  """--config.model.name with an NNX model written for pmap trains, prunes and
  fine-tunes from the CLI."""
  report = cli.prune_smoke_on_user_code(tmp_path, "nnx_pmap_cli", NNX_PMAP_MODEL,
                                      "--config.prune.round_to=1")  # 6-wide groups
  assert 0 < report["pruned_flops"] <= 0.5 * report["dense_flops"]


def test_nnx_model_with_two_axis_names_is_one_line_before_any_work(tmp_path, monkeypatch):
  (tmp_path / "nnx_pmap_two.py").write_text(
      NNX_PMAP_MODEL + "\n\ndef two(num_classes, rngs):\n"
      "  net = Net(num_classes, 'batch', rngs)\n"
      "  net.bn2 = nnx.BatchNorm(6, axis_name='model', rngs=rngs)\n  return net\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(UserError, match=r"axis names \('batch', 'model'\); one axis name"):
    external.build("nnx_pmap_two:two", None, 5, (6, 6, 3))


def test_search_space_on_an_nnx_pmap_model_mixes_with_global_batch_statistics(
    tmp_path, monkeypatch):
  """The TAS search's train-mode forward of an NNX model with BatchNorm over the 'batch'
  axis equals the same model with a plain BatchNorm, for the same sampled widths:
  logits and updated statistics."""
  from jaxprune import search  # pylint: disable=g-import-not-at-top
  (tmp_path / "nnx_pmap_s.py").write_text(NNX_PMAP_MODEL)
  monkeypatch.syspath_prepend(str(tmp_path))
  bound = external.build("nnx_pmap_s:make", None, 5, (6, 6, 3))
  plain = external.build("nnx_pmap_s:make", {"axis_name": None}, 5, (6, 6, 3))
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 3)), jnp.float32)
  variables = plain.init(jax.random.key(0), x, train=False)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, np.shape(a)), a.dtype),
                           variables)
  variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
  spaces = [search.SearchSpace(m, variables, (6, 6, 3)) for m in (bound, plain)]
  assert spaces[0].names == spaces[1].names and spaces[0].names
  picks = spaces[1].sample(spaces[1].init_arch(jax.random.key(1)), 1.0,
                           jax.random.key(int(rng.integers(1 << 30))))
  (yb, sb), (yp, sp) = [s.apply(variables, x, train=True, selections=picks) for s in spaces]
  np.testing.assert_allclose(yb, yp, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sb, sp)
