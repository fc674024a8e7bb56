"""The zoo's hand counts (tests/zoo/counts.py) against today's counters and a jaxpr reference.

The hand counts are closed forms written from the architectures; this pins them,
before the graph-based counter exists, against three independent things:
- ``jaxprune.flops.count`` (today's Linen counter: ``nn.Conv``/``nn.Dense`` calls
  only), for every part of the network it sees;
- a slow reference in this file that walks the forward jaxpr (nested jaxprs
  included) and counts conv_general_dilated / dot_general MACs and adds of a
  parameter onto a conv/dot_general output — the convention stated in the contract;
- the actual Linen variables and NNX state (params; batch statistics excluded).
It also pins that the Linen and NNX twins have the same parameter paths and outputs.
"""
import math

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import flops
from zoo import BY_NAME, ZOO, counts, example, init_linen, init_nnx, nnx_params, random_widths

NAMES = [a.name for a in ZOO]
# Layers today's Linen counter does not see (not nn.Conv / nn.Dense): their tags in counts.
_PASS_THROUGH = {"reshape", "broadcast_in_dim", "convert_element_type", "squeeze",
                 "expand_dims", "copy", "copy_p"}


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, jcore.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jcore.Jaxpr):
        yield v


def _walk(jaxpr, from_param, tally):
  """Counts MACs and bias adds of `jaxpr`; returns which outvars are contraction outputs.

  from_param: the invars that are parameters (or reshapes of them)."""
  param, contr = set(from_param), set()
  var = lambda v: isinstance(v, jcore.Var)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0]
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
      tally["macs"] += math.prod(out.aval.shape) * math.prod(rhs) // rhs[out_feature]
      contr.add(out)
    elif name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      tally["macs"] += math.prod(out.aval.shape) * math.prod(lhs[i] for i in lc)
      contr.add(out)
    elif name in ("add", "add_any"):
      a, b = eqn.invars
      if (var(a) and var(b) and ((a in contr and b in param) or (b in contr and a in param))):
        tally["bias_adds"] += math.prod(out.aval.shape)
    elif name in _PASS_THROUGH:
      if var(eqn.invars[0]) and eqn.invars[0] in param:
        param.add(out)
    else:
      subs = list(_sub_jaxprs(eqn))
      if subs:
        inner = subs[0]
        # Nested calls (pjit, checkpoint, custom_vjp_call) pass their operands positionally
        # (custom_vjp_call / pjit may put consts first: align from the end).
        k = len(eqn.invars) - len(inner.invars)
        inner_param = {iv for iv, ov in zip(inner.invars, eqn.invars[k:] if k >= 0 else
                                            eqn.invars)
                       if var(ov) and ov in param}
        inner_contr = _walk(inner, inner_param, tally)
        for iv, ov in zip(inner.outvars, eqn.outvars):
          if iv in inner_contr:
            contr.add(ov)
        for sub in subs[1:]:
          # Other branches/jaxprs (cond) would be counted too; the zoo has none.
          raise AssertionError(f"reference does not handle {name} with several jaxprs")
  return {v for v in jaxpr.outvars if var(v) and v in contr}


def jaxpr_reference(fn, params_like, x):
  """{"macs", "bias_adds"} of ``fn(params_like, x)`` from its jaxpr, per batch of x."""
  closed = jax.make_jaxpr(fn)(params_like, x)
  n_params = len(jax.tree.leaves(params_like))
  tally = {"macs": 0, "bias_adds": 0}
  _walk(closed.jaxpr, set(closed.jaxpr.invars[:n_params]), tally)
  return tally


def _linen_reference(arch, widths=None):
  model, variables = init_linen(arch, widths, abstract=True)
  x = jnp.zeros((1,) + arch.input_shape)
  return jaxpr_reference(lambda v, x: model.apply(v, x, train=False), variables, x)


def _nnx_reference(arch, widths=None):
  graphdef, state = nnx.split(init_nnx(arch, widths, abstract=True))
  x = jnp.zeros((1,) + arch.input_shape)
  return jaxpr_reference(lambda s, x: nnx.merge(graphdef, s)(x), state, x)


def _n_entries(tree):
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize("name", NAMES)
def test_hand_count_matches_the_counter_in_both_apis(name):
  """Every layer counts, transposed convolutions and attention's q.k and attn.v included
  (the old per-layer counter missed those two silently)."""
  arch = BY_NAME[name]
  model, variables = init_linen(arch, abstract=True)
  ledger = arch.count.ledger(arch.widths)
  got = flops.count(model, variables, arch.input_shape)
  assert got["flops"] == ledger.flops
  assert got["params"] == ledger.params
  got_nnx = flops.count(init_nnx(arch, abstract=True), None, arch.input_shape)
  assert got_nnx["flops"] == ledger.flops


@pytest.mark.parametrize("name", NAMES)
def test_hand_count_matches_the_jaxpr_reference_in_both_apis(name):
  arch = BY_NAME[name]
  ledger = arch.count.ledger(arch.widths)
  want = {"macs": ledger.macs, "bias_adds": ledger.bias_adds}
  assert _linen_reference(arch) == want
  assert _nnx_reference(arch) == want


@pytest.mark.parametrize("name", NAMES)
def test_hand_count_holds_at_smaller_widths(name):
  """A pruned network is the same code with smaller widths: the closed form must hold
  at any widths, not only the defaults."""
  arch = BY_NAME[name]
  rng = np.random.default_rng(abs(hash(name)) % 2**32)
  for _ in range(2):
    widths = random_widths(arch, rng)
    ledger = arch.count.ledger(widths)
    model, variables = init_linen(arch, widths, abstract=True)
    assert arch.widths_of(variables["params"]) == widths
    assert _n_entries(variables["params"]) == ledger.params
    assert _linen_reference(arch, widths) == {"macs": ledger.macs,
                                              "bias_adds": ledger.bias_adds}
    assert flops.count(model, variables, arch.input_shape)["flops"] == ledger.flops
    model_nnx = init_nnx(arch, widths, abstract=True)
    assert arch.widths_of(nnx_params(model_nnx)) == widths
    assert _n_entries(nnx.state(model_nnx, nnx.Param)) == ledger.params


@pytest.mark.parametrize("name", NAMES)
def test_params_count_trainable_entries_only(name):
  arch = BY_NAME[name]
  _, variables = init_linen(arch, abstract=True)
  model = init_nnx(arch, abstract=True)
  hand = arch.count(arch.widths)["params"]
  assert _n_entries(variables["params"]) == hand
  assert _n_entries(nnx.state(model, nnx.Param)) == hand
  stats = _n_entries(variables.get("batch_stats", {}))
  assert _n_entries(nnx.state(model, nnx.BatchStat)) == stats
  assert _n_entries(nnx.state(model)) >= hand + stats


@pytest.mark.parametrize("name", NAMES)
def test_linen_and_nnx_twins_have_the_same_paths_widths_and_outputs(name):
  arch = BY_NAME[name]
  model, variables = init_linen(arch)
  twin = init_nnx(arch)
  paths = lambda tree: sorted(jax.tree_util.keystr(p) for p, _ in
                              jax.tree_util.tree_flatten_with_path(tree)[0])
  assert paths(variables["params"]) == paths(nnx_params(twin))
  if "batch_stats" in variables:
    assert paths(variables["batch_stats"]) == paths(
        nnx.to_pure_dict(nnx.state(twin, nnx.BatchStat)))
  assert arch.widths_of(variables["params"]) == arch.widths_of(nnx_params(twin)) == arch.widths
  x = example(arch)
  y = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert y.shape == (2,) + arch.output_shape
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(twin, x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", ["linen", "nnx"])
def test_conv_transpose_lowers_to_a_dilated_conv_counted_over_every_output(make):
  """nn.ConvTranspose / nnx.ConvTranspose (stride s, no transpose_kernel) is one
  conv_general_dilated with lhs_dilation=(s, s) and window stride 1: its MACs are
  H_out * W_out * C_out * k*k * C_in, the dilation's zeros included."""
  cin, cout, k, s, h = 5, 7, 2, 2, 6
  x = jnp.zeros((1, h, h, cin))
  if make == "linen":
    layer = nn.ConvTranspose(cout, (k, k), strides=(s, s))
    variables = layer.init(jax.random.key(0), x)
    closed = jax.make_jaxpr(lambda v, x: layer.apply(v, x))(variables, x)
    params = variables
  else:
    layer = nnx.ConvTranspose(cin, cout, (k, k), strides=(s, s), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    closed = jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x))(params, x)
  convs = [e for e in closed.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 1
  eqn = convs[0]
  assert tuple(eqn.params["lhs_dilation"]) == (s, s)
  assert tuple(eqn.params["window_strides"]) == (1, 1)
  assert eqn.invars[1].aval.shape == (k, k, cin, cout)  # HWIO, not flipped in shape
  assert eqn.outvars[0].aval.shape == (1, h * s, h * s, cout)
  ledger = counts.Ledger()
  ledger.conv((h * s) ** 2, cin, cout, k, bias=True)
  ref = jaxpr_reference(
      (lambda v, x: layer.apply(v, x)) if make == "linen"
      else (lambda st, x: nnx.merge(graphdef, st)(x)), params, x)
  assert ref == {"macs": ledger.macs, "bias_adds": ledger.bias_adds}


def test_resnets_zero_init_their_last_bn_and_mobilenets_are_depthwise():
  from zoo import linen_models as L, nnx_models as N  # pylint: disable=import-outside-toplevel
  x = jnp.ones((1, 4, 4, 8))
  for block, twin, last in ((L.ResNetBlock(8, 6, train=False), N.ResNetBlock(8, 8, 6,
                                                                             rngs=nnx.Rngs(0)),
                             "bn2"),
                            (L.BottleneckResNetBlock(8, 4, 4, train=False),
                             N.BottleneckResNetBlock(8, 8, 4, 4, rngs=nnx.Rngs(0)), "bn3")):
    raw = block.init(jax.random.key(0), x)["params"]
    assert raw[last]["scale"].shape == (8,) and not np.any(raw[last]["scale"])
    assert not np.any(getattr(twin, last).scale[...])
    assert "conv_proj" not in raw and twin.conv_proj is None
  _, variables = init_linen(BY_NAME["resnet_basic"], abstract=True)
  assert "conv_proj" in variables["params"]["s2b0"]
  _, variables = init_linen(BY_NAME["resnet_bottleneck"], abstract=True)
  assert "conv_proj" in variables["params"]["s1b0"]
  assert "conv_proj" not in variables["params"]["s1b1"]
  _, variables = init_linen(BY_NAME["mobilenet_v1"], abstract=True)
  assert variables["params"]["dw1"]["kernel"].shape == (3, 3, 1, 8)
  _, variables = init_linen(BY_NAME["mobilenet_v2"], abstract=True)
  assert variables["params"]["b1"]["dw"]["kernel"].shape == (3, 3, 1, 16)


def test_attention_einsums_are_dot_generals_with_heads_as_batch_axes():
  """Both APIs' attention: q.k and attn.v are dot_generals batched over (batch, heads);
  NNX reshapes q to (b, n, heads, 1, d) first (a kv-group axis of size 1)."""
  arch = BY_NAME["vit"]
  model, variables = init_linen(arch, abstract=True)
  x = jnp.zeros((1,) + arch.input_shape)
  lin = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  graphdef, state = nnx.split(init_nnx(arch, abstract=True))
  nx = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)

  def batched_dots(closed):
    return [e for e in closed.jaxpr.eqns if e.primitive.name == "dot_general"
            and e.params["dimension_numbers"][1][0]]
  w = arch.widths
  n = counts.VIT_TOKENS
  for closed in (lin, nx):
    dots = batched_dots(closed)
    assert len(dots) == 2
    # q.k: (batch, heads, [1,] n, n); attn.v: (batch, heads, [1,] v_dim, n) (NNX adds the 1)
    assert sorted(math.prod(e.outvars[0].aval.shape) for e in dots) == sorted(
        [w["heads"] * n * n, w["heads"] * w["v_dim"] * n])
  assert any(e.primitive.name == "reshape" and e.outvars[0].aval.shape ==
             (1, n, w["heads"], 1, w["qk_dim"]) for e in nx.jaxpr.eqns)
