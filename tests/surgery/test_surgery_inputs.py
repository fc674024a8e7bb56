"""Several inputs (token ids, an attention mask, token types) through every surgery
function and its own checks (issue 22): ``prune_zeros``, ``shrink`` and
``check_equivalence`` take ``call=`` with ``input_shape`` a pytree of
``jax.ShapeDtypeStruct`` s, and their probes are built from it (integer inputs 0 or 1).

The model is the zoo's BERT-style encoder (tests/zoo_models.py). A few hidden units of its
first MLP get their fan-in (kernel columns and bias) zeroed: gelu(0) = 0, so those units are
dead and removing them is exact.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import graph, surgery
from jaxprune.errors import UserError
from jaxprune.surgery.rebuild import probe_inputs
import zoo_models as Z

SPEC = Z.BY_NAME["bert"]


def _bert_with_dead_units(seed):
  """(model, variables with `dead` MLP units of layer 0 gated off, call, dead units)."""
  model, variables = SPEC.build(seed)
  rng = np.random.default_rng(seed)
  dead = np.sort(rng.choice(Z.MLP, int(rng.integers(3, 9)), replace=False))
  params = jax.tree.map(np.array, variables["params"])
  params["layer0_inter"]["kernel"][:, dead] = 0
  params["layer0_inter"]["bias"][dead] = 0
  return model, {"params": jax.tree.map(jnp.asarray, params)}, SPEC.call(model), dead


def _logits(model, variables, inputs):
  return np.asarray(model.apply(variables, *SPEC.args(inputs)), np.float64)


def test_probe_inputs_follow_the_pytree_with_integers_in_range():
  probe = probe_inputs(SPEC.inputs, 3, seed=int(np.random.default_rng().integers(1 << 30)))
  assert set(probe) == set(SPEC.inputs)
  for k, s in SPEC.inputs.items():
    assert probe[k].shape == (3,) + s.shape and probe[k].dtype == s.dtype
    assert set(np.unique(np.asarray(probe[k]))) <= {0, 1}  # any table of >= 2 rows
  images = probe_inputs((4, 4, 3), 5)
  assert images.shape == (5, 4, 4, 3) and images.dtype == jnp.float32
  assert abs(float(jnp.std(images)) - 1) < 0.3  # standard normal, 240 draws


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_prune_zeros_takes_token_ids_and_a_mask_and_checks_on_them(seed):
  model, variables, call, dead = _bert_with_dead_units(seed)
  small, info = surgery.prune_zeros(model, variables, SPEC.inputs, call)
  (gid,) = [g for g, kept in info["keep"].items() if kept.size < Z.MLP]
  np.testing.assert_array_equal(np.setdiff1d(np.arange(Z.MLP), info["keep"][gid]), dead)
  assert small.variables["params"]["layer0_inter"]["kernel"].shape == (Z.WIDTH, Z.MLP - dead.size)
  assert info["max_abs_diff"] < 1e-5
  inputs = SPEC.example(3, seed=seed + 7)  # real token ids and a padded mask
  np.testing.assert_allclose(_logits(small.model, small.variables, inputs),
                             _logits(model, variables, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_shrink_and_check_equivalence_take_several_inputs():
  model, variables, call, dead = _bert_with_dead_units(2)
  shrunk = surgery.shrink(model, variables, SPEC.inputs, call)
  assert shrunk.widths_after["layer0_inter"] == Z.MLP - dead.size
  np.testing.assert_array_equal(np.setdiff1d(np.arange(Z.MLP), shrunk.kept["layer0_inter"]),
                                dead)
  probe = SPEC.example(4, seed=3)
  report = surgery.check_equivalence(model, variables, shrunk, probe, call)
  assert report["logits_max_abs_diff"] < 1e-5 * max(report["logits_max_abs"], 1)
  assert report["interior_max_abs_diff"] < 1e-5 * max(report["activation_max_abs"], 1)
  assert report["argmax_agreement"] == 1.0 and report["approximate"] == {}


def test_check_equivalence_with_a_probe_missing_an_input_is_one_line():
  model, variables, call, _ = _bert_with_dead_units(0)
  unchanged = surgery.Shrunk(model=model, variables=variables, kept={}, widths_before={},
                             widths_after={}, rounds=0)
  probe = SPEC.example(2)
  probe.pop("token_type_ids")
  with pytest.raises(UserError) as e:
    surgery.check_equivalence(model, variables, unchanged, probe, call,
                              input_shape=SPEC.inputs)
  assert "\n" not in str(e.value) and "2 input(s)" in str(e.value), str(e.value)


@pytest.mark.slow
def test_shrink_of_dead_head_dim_channels_folds_the_scale_and_checks_equal():
  """Head-dimension channels of layer 0 with no fan-in (query, key and value columns and
  biases zero) are removed; the 1/sqrt(head_dim) fold (a compensated group) keeps the
  network the masked one's, and check_equivalence accounts for the scaled query."""
  model, variables = SPEC.build(3)
  hd = Z.WIDTH // Z.HEADS
  dead = np.sort(np.random.default_rng(3).choice(hd, 3, replace=False))
  params = jax.tree.map(np.array, variables["params"])
  for name in ("query", "key", "value"):
    params["layer0_attn"][name]["kernel"][..., dead] = 0
    params["layer0_attn"][name]["bias"][..., dead] = 0
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  call = SPEC.call(model)
  shrunk = surgery.shrink(model, variables, SPEC.inputs, call)
  (label,) = [k for k, w in shrunk.widths_after.items() if w < shrunk.widths_before[k]]
  assert shrunk.widths_before[label] == hd and shrunk.widths_after[label] == hd - dead.size
  assert shrunk.scaled["params/layer0_attn/query/kernel"] == pytest.approx(
      np.sqrt((hd - dead.size) / hd))
  report = surgery.check_equivalence(model, variables, shrunk, SPEC.example(4, seed=5), call)
  assert report["logits_max_abs_diff"] < 1e-5 * max(report["logits_max_abs"], 1)
  assert report["interior_max_abs_diff"] < 1e-5 * max(report["activation_max_abs"], 1)
  assert report["approximate"] == {}


@pytest.mark.slow
def test_one_token_id_struct_is_one_example_for_the_trace_and_the_rebuild():
  """`input_shape=jax.ShapeDtypeStruct((T,), int32)` (no call=) is one example of T ids
  for the rebuild's check as it is for the trace (the check used to call the module with
  a 1-D batch and fail with a misleading 'width from a configuration' error)."""
  spec = Z.BY_NAME["gpt"]
  seed = int(np.random.default_rng().integers(1 << 16))
  model, variables = spec.build(seed)
  ids = jax.ShapeDtypeStruct((Z.TOKENS,), jnp.int32)
  g = graph.trace(model, variables, ids)
  mlp = next(gr for gr in g.prunable() if gr.kind == "mlp")
  rng = np.random.default_rng(seed)
  kept = np.sort(rng.choice(mlp.width, mlp.width // 2, replace=False))
  small = surgery.prune(model, variables, ids, {mlp.id: kept}, graph=g)
  x = jnp.asarray(rng.integers(0, Z.VOCAB, size=(2, Z.TOKENS)), jnp.int32)
  # The masked original: the removed MLP units' fan-in (kernel columns and bias) zeroed.
  params = jax.tree.map(np.array, variables["params"])
  masked = np.setdiff1d(np.arange(mlp.width), kept)
  for m in mlp.members:
    if m.role == "producer":
      owner = m.path.split("/")[1]
      params[owner]["kernel"][..., m.index[masked].ravel()] = 0
      params[owner]["bias"][m.index[masked].ravel()] = 0
  want = model.apply({"params": params}, x)
  got = small.model.apply(small.variables, x)
  assert got.shape == want.shape == (2, Z.TOKENS, Z.VOCAB)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
