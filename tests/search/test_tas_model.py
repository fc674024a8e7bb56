"""Tests for the TAS searchable ResNet, its costs and cost loss (tas.md §1-5)."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import sweep
from jaxprune import flops
from jaxprune import kernels
from jaxprune import search
from jaxprune import models
from jaxprune.errors import UserError
from jaxprune.kernels.cost import tas_cost_loss
from jaxprune.models.tas_resnet import CandidateBatchNorm
from jaxprune.models.tas_resnet import SearchConv
from jaxprune.search import Selection

HIGHEST = jax.lax.Precision.HIGHEST


def _arch_tree(model, width_fn, depth_fn):
  """An ``arch`` collection built from the model's paths (no tracing)."""
  widths = {}
  for path, candidates in zip(model.conv_paths(), model.conv_candidates()):
    node = widths
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(width_fn(len(candidates)), jnp.float32)
  depths = {f"stage{s}": jnp.asarray(depth_fn(len(choices)), jnp.float32)
            for s, choices in enumerate(model.stage_candidates())}
  return {"width_logits": widths, "depth_logits": depths}


def _one_hot_last(n, big=30.0):
  return np.eye(n)[-1] * big


def _abstract_init(model, input_shape):
  return jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32))


@functools.lru_cache(maxsize=None)
def _search_net(depth, block=None):
  """Model and variables for 8x8 inputs, shared by the tests."""
  model = models.tas_cifar_resnet(depth, block=block)
  x = jnp.zeros((2, 8, 8, 3))
  variables = jax.jit(lambda k: model.init(
      k, x, train=False, tau=1.0, key=jax.random.key(0)))(jax.random.key(0))
  return model, flax.core.unfreeze(variables)


# --- §1 search space ---------------------------------------------------------


def test_width_candidates_match_reference():
  assert models.width_candidates(16) == (4, 6, 8, 9, 11, 12, 14, 16)
  assert models.width_candidates(32) == (9, 12, 16, 19, 22, 25, 28, 32)
  assert models.width_candidates(64) == (19, 25, 32, 38, 44, 51, 57, 64)


@pytest.mark.parametrize("depth,choices", [
    (20, (1, 2, 3)),
    (32, (1, 3, 5)),
    (56, (1, 3, 5, 7, 9)),
    (110, (1, 3, 5, 7, 9, 11, 13, 15, 17, 18)),
    (164, (1, 3, 5, 7, 9, 11, 13, 15, 17, 18)),
])
def test_depth_candidates_match_reference(depth, choices):
  model = models.tas_cifar_resnet(depth)
  assert model.stage_candidates() == [choices] * 3
  assert models.depth_candidates(2) == (1, 2)


def test_arch_collection_has_one_logit_vector_per_conv_and_stage():
  model, variables = _search_net(14)
  expected = jax.tree.map(jnp.shape, _arch_tree(model, np.zeros, np.zeros))
  assert jax.tree.map(jnp.shape, variables["arch"]) == expected
  assert jax.tree.map(jnp.shape, model.init_arch(jax.random.key(1))) == expected
  assert variables["arch"]["width_logits"]["stage1_block1"]["conv_b"].shape == (
      8,)
  # N(0, 0.01) init (§1).
  leaves = np.concatenate(jax.tree.leaves(model.init_arch(jax.random.key(2))))
  assert 0.003 < leaves.std() < 0.03
  # No architecture parameter leaks into the weights' collection.
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(variables["params"])]
  assert not [p for p in paths if "logits" in p]


# --- §5 costs ----------------------------------------------------------------


def _assert_all_max_costs(model, arch, depth, layout, shape, expected):
  """The all-max architecture derives the plain network and costs its FLOPs."""
  assert model.derive(arch) == {"widths": models.default_widths(depth, layout),
                                "blocks": models.default_blocks(depth, layout)}
  assert search.tas_argmax_cost(model, arch, shape) == expected
  np.testing.assert_allclose(search.tas_argmax_cost_traced(model, arch, shape),
                             expected, rtol=1e-6)
  # Softmax of one-hot-ish logits: E_cost is the plain count less the
  # classifier's bias adds (the official E_cost has none).
  np.testing.assert_allclose(search.tas_expected_cost(model, arch, shape),
                             expected - 10, rtol=1e-5)


@pytest.mark.parametrize("depth", sweep([20, 56, 164], {20, 56}))
def test_argmax_cost_of_full_architecture_equals_plain_flops(depth):
  model = models.tas_cifar_resnet(depth)
  arch = _arch_tree(model, _one_hot_last, _one_hot_last)
  plain = models.cifar_resnet(depth)
  expected = flops.count(plain, _abstract_init(plain, (32, 32, 3)),
                         (32, 32, 3))["flops"]
  _assert_all_max_costs(model, arch, depth, "cifar", (32, 32, 3), expected)


@pytest.mark.parametrize("depth,seed", [(20, 0), (20, 1), (164, 2)])
def test_argmax_cost_of_random_architecture_equals_derived_count(depth, seed):
  rng = np.random.default_rng(seed)
  model = models.tas_cifar_resnet(depth)
  arch = _arch_tree(model, rng.normal, rng.normal)
  shape = model.derive(arch)
  derived = models.cifar_resnet(depth, widths=shape["widths"],
                                blocks=shape["blocks"])
  expected = flops.count(derived, _abstract_init(derived, (32, 32, 3)),
                         (32, 32, 3))["flops"]
  assert search.tas_argmax_cost(model, arch, (32, 32, 3)) == expected
  traced = jax.jit(lambda a: search.tas_argmax_cost_traced(
      model, a, (32, 32, 3)))(arch)
  np.testing.assert_allclose(traced, expected, rtol=1e-6)


def _slow_expected_cost_resnet20(arch, model):
  """E_cost of ResNet-20 at 32x32 written out by hand (§5), float64."""
  def softmax(v):
    v = np.asarray(v, np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()
  e = [softmax(a) @ np.asarray(c, np.float64) for a, c in
       zip(model.width_logits(arch), model.conv_candidates())]
  positions = [32 * 32, 16 * 16, 8 * 8]
  cost, prev, i = 9 * 3 * e[0] * positions[0], e[0], 1
  for s in range(3):
    probs = softmax(arch["depth_logits"][f"stage{s}"])
    choices = (1, 2, 3)
    for b in range(3):
      reach = sum(p for p, c in zip(probs, choices) if c >= b + 1)
      block = 9 * (prev * e[i] + e[i] * e[i + 1]) * positions[s]
      if s > 0 and b == 0:  # the stride-2 shortcut's 1x1 conv
        block += prev * e[i + 1] * positions[s]
      cost += reach * block
      prev, i = e[i + 1], i + 2
  return cost + prev * 10


def test_expected_cost_matches_slow_reference():
  rng = np.random.default_rng(3)
  model = models.tas_cifar_resnet(20)
  arch = _arch_tree(model, lambda n: rng.normal(size=n) * 2,
                    lambda n: rng.normal(size=n) * 2)
  np.testing.assert_allclose(
      jax.jit(lambda a: search.tas_expected_cost(model, a, (32, 32, 3)))(arch),
      _slow_expected_cost_resnet20(arch, model), rtol=1e-5)


def test_expected_cost_gradient_has_the_right_sign():
  rng = np.random.default_rng(4)
  model = models.tas_cifar_resnet(20)
  arch = _arch_tree(model, lambda n: rng.normal(size=n) * 0.01,
                    lambda n: rng.normal(size=n) * 0.01)
  grads = jax.grad(lambda a: search.tas_expected_cost(model, a, (32, 32, 3)))(
      arch)
  for g in model.width_logits(grads):
    # Favouring the widest candidate raises the cost, the narrowest lowers it.
    assert g[-1] > 0 and g[0] < 0
  for g in model.depth_logits(grads):
    assert g[-1] > 0 and g[0] < 0


@pytest.mark.parametrize("mode,f_cost,sign", [
    # R = 100 * 0.5 = 50, tol = 0.1.
    ("code", 30.0, -1), ("code", 39.9, -1), ("code", 40.0, 0),
    ("code", 45.0, 0), ("code", 50.0, 0), ("code", 50.1, 1), ("code", 80, 1),
    ("paper", 30.0, -1), ("paper", 44.9, -1), ("paper", 45.0, 0),
    ("paper", 50.0, 0), ("paper", 55.0, 0), ("paper", 55.1, 1),
    ("paper", 80.0, 1),
])
def test_cost_loss_sign_logic(mode, f_cost, sign):
  e_cost = np.exp(1.7)
  loss_fn = jax.jit(jax.value_and_grad(functools.partial(
      tas_cost_loss, flops_max=100.0, ratio=0.5, tol=0.1, mode=mode)))
  loss, grad = loss_fn(e_cost, f_cost)  # f_cost traced: one compile per mode
  np.testing.assert_allclose(loss, sign * 1.7, rtol=1e-6)
  np.testing.assert_allclose(grad, sign / e_cost, rtol=1e-6)


def test_cost_loss_rejects_unknown_mode():
  with pytest.raises(ValueError, match="mode"):
    tas_cost_loss(1.0, 1.0, 1.0, 0.5, 0.05, mode="both")


# --- §4 searchable conv unit -------------------------------------------------


def _bn_reference(y, scale, bias, mean, var):
  return (y - mean) / np.sqrt(var + 1e-5) * scale + bias


@pytest.mark.parametrize("train", [True, False])
def test_search_conv_matches_slow_reference(train):
  """Full-width fused form == the §4 formula on sliced tensors, zeros beyond."""
  rng = np.random.default_rng(5 + train)
  c_in, c_valid, c_full = 8, 5, 16
  candidates = models.width_candidates(c_full)
  alpha = rng.normal(size=8).astype(np.float32)
  key, tau = jax.random.key(7), 0.7
  idx, w = kernels.gumbel_select(key, alpha, tau, k=2)
  widths = [candidates[int(i)] for i in idx]
  picks = Selection(idx, w, jnp.asarray(widths, jnp.int32))
  idx = [int(i) for i in idx]

  conv = SearchConv(c_full, 3, precision=HIGHEST)
  x = rng.normal(size=(3, 6, 6, c_in)).astype(np.float32)
  x[..., c_valid:] = 0  # the previous layer's zero padding
  variables = flax.core.unfreeze(conv.init(jax.random.key(0), x, picks,
                                           train=False))
  kernel = rng.normal(size=(3, 3, c_in, c_full)).astype(np.float32)
  bn = {"scale": rng.uniform(0.5, 2, (8, c_full)),
        "bias": rng.normal(size=(8, c_full))}
  stats = {"mean": rng.normal(size=(8, c_full)),
           "var": rng.uniform(0.5, 2, (8, c_full))}
  variables["params"] = {"conv": {"kernel": kernel}, "bn": bn}
  variables["batch_stats"] = {"bn": stats}
  variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)

  out, updates = jax.jit(lambda v, x, picks: conv.apply(
      v, x, picks, train=train, mutable=["batch_stats"]))(variables, x, picks)

  y = np.asarray(jax.lax.conv_general_dilated(
      x[..., :c_valid], kernel[:, :, :c_valid], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST),
                 np.float64)
  c_max = max(widths)
  expected = 0
  for pick, (j, c) in enumerate(zip(idx, widths)):
    y_j = y[..., :c]
    if train:
      mean, var = y_j.mean(axis=(0, 1, 2)), y_j.var(axis=(0, 1, 2))
    else:
      mean, var = stats["mean"][j, :c], stats["var"][j, :c]
    bn_j = _bn_reference(y_j, bn["scale"][j, :c], bn["bias"][j, :c], mean, var)
    # §4: out = sum_j w_j * CWI(BN_j(y[:C_j]) -> max(C_a, C_b)).
    expected = expected + float(w[pick]) * np.asarray(
        kernels.cwi(jnp.asarray(bn_j, jnp.float32), c_max, precision=HIGHEST),
        np.float64)
  expected = np.maximum(expected, 0)
  np.testing.assert_allclose(out[..., :c_max], expected, rtol=1e-4, atol=1e-4)
  # Everything beyond the valid width is exactly zero.
  assert not np.any(np.asarray(out[..., c_max:]))

  new = updates["batch_stats"]["bn"]
  for name in ("mean", "var"):
    old, moved = stats[name], np.asarray(new[name], np.float64)
    for j in range(8):
      if j not in idx or not train:
        np.testing.assert_array_equal(moved[j], np.float32(old[j]))
    if train:
      count = y.size // c_full
      for j, c in zip(idx, widths):
        batch = (y[..., :c].mean(axis=(0, 1, 2)) if name == "mean" else
                 y[..., :c].var(axis=(0, 1, 2)) * count / (count - 1))
        np.testing.assert_allclose(moved[j, :c], 0.9 * old[j, :c] + 0.1 * batch,
                                   rtol=1e-4, atol=1e-5)
        # Columns beyond the candidate's width are never touched.
        np.testing.assert_array_equal(moved[j, c:], np.float32(old[j, c:]))


def test_candidate_batch_norm_is_zero_beyond_each_width():
  rng = np.random.default_rng(8)
  y = jnp.asarray(rng.normal(size=(4, 3, 3, 16)), jnp.float32)
  picks = Selection(jnp.array([5, 2]), jnp.array([0.3, 0.7]),
                    jnp.array([12, 8], jnp.int32))
  bn = CandidateBatchNorm(models.width_candidates(16))
  variables = bn.init(jax.random.key(0), y, picks, train=True)
  (center, gain, shift), _ = bn.apply(variables, y, picks, train=True,
                                      mutable=["batch_stats"])
  out = (y - center)[None] * gain[:, None, None, None] + shift[:, None, None,
                                                                  None]
  assert not np.any(np.asarray(out[0, ..., 12:]))
  assert not np.any(np.asarray(out[1, ..., 8:]))
  # With scale 1, bias 0: each valid channel has batch mean 0 and var ~1.
  np.testing.assert_allclose(out[0, ..., :12].mean(axis=(0, 1, 2)), 0,
                             atol=1e-5)
  np.testing.assert_allclose(out[1, ..., :8].var(axis=(0, 1, 2)), 1, rtol=1e-3)


# --- §4 whole search network -------------------------------------------------


@pytest.mark.slow
def test_search_forward_compiles_once_for_every_sample():
  model, variables = _search_net(14)
  traces = []

  @jax.jit
  def forward(variables, x, tau, key):
    traces.append(1)
    return model.apply(variables, x, train=True, tau=tau, key=key,
                       mutable=["batch_stats"])

  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  outs = []
  for seed, tau in [(0, 5.0), (1, 1.0), (2, 0.1), (3, 3.3)]:
    logits, updates = forward(variables, x, jnp.float32(tau),
                              jax.random.key(seed))
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))
    outs.append(np.asarray(logits))
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1])  # different samples, one program
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


@pytest.mark.slow
def test_gradients_reach_width_and_depth_logits():
  model, variables = _search_net(14)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  labels = jnp.array([1, 7])

  def loss(arch):
    logits, _ = model.apply({**variables, "arch": arch}, x, train=True,
                            tau=1.0, key=jax.random.key(3),
                            mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

  grads = jax.jit(jax.grad(loss))(variables["arch"])
  for g in model.width_logits(grads) + model.depth_logits(grads):
    assert np.all(np.isfinite(g))
    assert np.any(np.asarray(g) != 0)


def _plain_variables_from_search(model, search, plain_params_shape):
  """Plain-net variables that equal the search net's widest candidates."""
  params, stats = search["params"], search["batch_stats"]
  top = -1  # the full-width candidate's BN row

  def conv_bn(src_p, src_s):
    return ({"kernel": src_p["conv"]["kernel"]},
            {"scale": src_p["bn"]["scale"][top],
             "bias": src_p["bn"]["bias"][top]},
            {"mean": src_s["bn"]["mean"][top], "var": src_s["bn"]["var"][top]})

  out_p, out_s = {}, {}
  k, bp, bs = conv_bn(params["stem"], stats["stem"])
  out_p["stem_conv"], out_p["stem_bn"], out_s["stem_bn"] = k, bp, bs
  for name in plain_params_shape:
    if not name.startswith("stage"):
      continue
    block_p, block_s = {}, {}
    for child in plain_params_shape[name]:
      kind, letter = child.split("_")
      if child == "shortcut_conv":
        block_p[child] = {"kernel": params[name]["shortcut"]["conv"]["kernel"]}
      elif child == "shortcut_bn":  # ImageNet: the derived net has this BN
        _, block_p[child], block_s[child] = conv_bn(params[name]["shortcut"],
                                                    stats[name]["shortcut"])
      elif kind == "conv":
        block_p[child], bp, bs = conv_bn(params[name][child],
                                         stats[name][child])
        block_p[f"bn_{letter}"], block_s[f"bn_{letter}"] = bp, bs
    out_p[name], out_s[name] = block_p, block_s
  out_p["classifier"] = params["classifier"]
  return {"params": out_p, "batch_stats": out_s}


def _identity_shortcut_bn(variables):
  """Sets the search-only BN after every shortcut conv to the identity (in place)."""
  for name, block_vars in variables["params"].items():
    if "shortcut" in block_vars:
      block_vars["shortcut"]["bn"]["scale"][:] = 1
      block_vars["shortcut"]["bn"]["bias"][:] = 0
      stats = variables["batch_stats"][name]["shortcut"]["bn"]
      stats["mean"][:] = 0
      stats["var"][:] = 1 - 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("depth,block", [(14, "basic"), (11, "bottleneck")])
def test_forced_full_width_choice_matches_plain_network(depth, block):
  """Eval mode with the widest width and deepest depth forced == plain net."""
  rng = np.random.default_rng(9)
  model, variables = _search_net(depth, block)
  variables = jax.tree.map(np.asarray, variables)
  # Random weights, BN parameters and running statistics everywhere ...
  variables["params"] = jax.tree.map(
      lambda v: rng.normal(size=v.shape).astype(np.float32) * 0.5 + (
          1.0 if v.ndim == 2 and v.shape[0] == 8 else 0.0),
      variables["params"])
  variables["batch_stats"] = jax.tree.map(
      lambda v: (rng.uniform(0.5, 2, v.shape) if v.ndim == 2 else v).astype(
          np.float32), variables["batch_stats"])
  # ... except the search-only BN after each shortcut conv: identity.
  _identity_shortcut_bn(variables)
  variables["arch"] = _arch_tree(model, _one_hot_last, _one_hot_last)

  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda v, x: model.apply(
        v, x, train=False, tau=0.1, key=jax.random.key(5)))(variables, x)

  plain = models.cifar_resnet(depth, block=block)
  shapes = _abstract_init(plain, (8, 8, 3))
  plain_vars = _plain_variables_from_search(model, variables, shapes["params"])
  assert jax.tree.structure(plain_vars) == jax.tree.structure(
      flax.core.unfreeze(shapes))
  with jax.default_matmul_precision("highest"):
    expected = jax.jit(lambda v, x: plain.apply(v, x, train=False))(
        plain_vars, x)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_derive_builds_the_argmax_network():
  rng = np.random.default_rng(10)
  model = models.tas_cifar_resnet(20)
  arch = _arch_tree(model, rng.normal, rng.normal)
  shape = model.derive(arch)
  assert len(shape["widths"]) == len(models.default_widths(20))
  for width, candidates, logits in zip(shape["widths"],
                                       model.conv_candidates(),
                                       model.width_logits(arch)):
    assert width == candidates[int(np.argmax(logits))]
  assert shape["blocks"] == [(1, 2, 3)[int(np.argmax(b))]
                             for b in model.depth_logits(arch)]
  net = model.derived_network(arch)
  assert list(net.widths) == shape["widths"]
  assert list(net.blocks) == shape["blocks"]


# --- ImageNet layout (§1: ImageNet depth candidates; §4, §5) ------------------


def _imagenet_search_variables(model, x, rng):
  """Random search-net variables (no init compile), arch logits N(0, 0.01).

  Kernels are N(0, 1/fan_in) and BN statistics near 1, so activations stay
  O(1) through ResNet-50 in eval mode.
  """
  shapes = jax.eval_shape(lambda x: model.init(
      jax.random.key(0), x, train=False, tau=1.0, key=jax.random.key(1)), x)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      v = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif "scale" in name:
      v = rng.uniform(0.5, 1.5, leaf.shape)
    elif "var" in name:
      v = rng.uniform(0.5, 2.0, leaf.shape)
    else:  # bias, mean
      v = rng.normal(size=leaf.shape) * 0.1
    return np.asarray(v, np.float32)
  variables = {k: jax.tree_util.tree_map_with_path(fill, v)
               for k, v in flax.core.unfreeze(shapes).items() if k != "arch"}
  variables["arch"] = model.init_arch(jax.random.key(2))
  return variables


@pytest.mark.parametrize("depth,choices", [
    (18, [(1, 2)] * 4),
    (50, [(1, 2, 3), (1, 2, 4), (2, 4, 6), (1, 2, 3)]),
])
def test_imagenet_depth_candidates_match_reference(depth, choices):
  model = models.tas_imagenet_resnet(depth)
  assert model.stage_candidates() == choices
  assert model.layout == "imagenet" and model.num_classes == 1000
  assert model.full_widths() == models.default_widths(depth, "imagenet")
  assert model.conv_candidates()[0] == models.width_candidates(64)
  assert models.imagenet_depth_candidates([3, 8, 36, 3])[1] == (2, 5, 8)


def test_imagenet_factory_rejects_unknown_depth():
  with pytest.raises(UserError, match="18"):
    models.tas_imagenet_resnet(20)
  with pytest.raises(UserError, match="bottleneck"):
    models.TASResNet(depth=50, layout="imagenet").init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False, tau=1.0,
        key=jax.random.key(1))


@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_argmax_cost_of_full_architecture_equals_plain_flops(depth):
  model = models.tas_imagenet_resnet(depth, 10)
  arch = _arch_tree(model, _one_hot_last, _one_hot_last)
  plain = models.imagenet_resnet(depth, 10)
  expected = flops.count(plain, _abstract_init(plain, (64, 64, 3)),
                         (64, 64, 3))["flops"]
  _assert_all_max_costs(model, arch, depth, "imagenet", (64, 64, 3), expected)


@pytest.mark.parametrize("depth,seed", [(18, 0), (18, 1), (50, 2), (50, 3)])
def test_imagenet_argmax_cost_of_random_architecture_equals_derived_count(
    depth, seed):
  rng = np.random.default_rng(seed)
  model = models.tas_imagenet_resnet(depth, 10)
  # Depth logits biased to the shallowest candidate: depth-pruned stages.
  arch = _arch_tree(model, rng.normal,
                    lambda n: rng.normal(size=n) - 2 * np.arange(n))
  derived = model.derived_network(arch)
  shape = model.derive(arch)
  assert derived.layout == "imagenet"
  assert list(derived.widths) == shape["widths"]
  assert list(derived.blocks) == shape["blocks"]
  assert shape["blocks"] != models.default_blocks(depth, "imagenet")
  expected = flops.count(derived, _abstract_init(derived, (64, 64, 3)),
                         (64, 64, 3))["flops"]
  assert search.tas_argmax_cost(model, arch, (64, 64, 3)) == expected
  traced = jax.jit(lambda a: search.tas_argmax_cost_traced(
      model, a, (64, 64, 3)))(arch)
  np.testing.assert_allclose(traced, expected, rtol=1e-6)


@pytest.mark.slow
def test_imagenet_search_forward_compiles_once_and_reaches_all_logits():
  model = models.tas_imagenet_resnet(18, 10)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _imagenet_search_variables(model, x, np.random.default_rng(12))
  traces = []
  labels = jnp.array([1, 7])

  @jax.jit
  def step(variables, x, tau, key):
    traces.append(1)

    def loss(arch):
      logits, updates = model.apply(
          {**variables, "arch": arch}, x, train=True, tau=tau, key=key,
          mutable=["batch_stats"])
      ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])
      return ce, (logits, updates)
    return jax.grad(loss, has_aux=True)(variables["arch"])

  outs = []
  for seed, tau in [(0, 5.0), (1, 1.0), (2, 0.1)]:
    grads, (logits, updates) = step(variables, x, jnp.float32(tau),
                                    jax.random.key(seed))
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))
    outs.append(np.asarray(logits))
    for g in model.width_logits(grads) + model.depth_logits(grads):
      assert np.all(np.isfinite(g))
      assert np.any(np.asarray(g) != 0)
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1])
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_forced_full_width_choice_matches_plain_network(depth):
  """Eval mode, widest/deepest forced == plain ImageNet ResNet, same weights.

  Unlike CIFAR, the search net's shortcut BN is the derived net's own
  shortcut BN (torchvision 1x1 conv + BN), so it carries random values too.
  """
  rng = np.random.default_rng(11 + depth)
  model = models.tas_imagenet_resnet(depth, 10)
  x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  variables = _imagenet_search_variables(model, x, rng)
  variables["arch"] = _arch_tree(model, _one_hot_last, _one_hot_last)

  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda v, x: model.apply(
        v, x, train=False, tau=0.1, key=jax.random.key(5)))(variables, x)

  plain = model.plain_network()
  shapes = _abstract_init(plain, (32, 32, 3))
  plain_vars = _plain_variables_from_search(model, variables, shapes["params"])
  assert jax.tree.structure(plain_vars) == jax.tree.structure(
      flax.core.unfreeze(shapes))
  with jax.default_matmul_precision("highest"):
    expected = jax.jit(lambda v, x: plain.apply(v, x, train=False))(
        plain_vars, x)
  assert np.std(expected) > 1e-2  # not a degenerate comparison
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# --- the backend default's narrow convs whole (search.ResNetSpace target_ratio) ------


@pytest.mark.slow
def test_whole_convs_search_only_their_full_width_and_match_the_plain_network():
  """A TASResNet with ``whole`` convs: one candidate (their full width) and a one-entry
  logit each, zero gradient to it, the other logits reached; forcing the widest
  candidate elsewhere gives the plain network (the same check as the one above, on
  random weights and statistics, the whole convs drawn at random)."""
  rng = np.random.default_rng()
  base = models.tas_cifar_resnet(8, round_to=8)
  n = len(base.full_widths())
  whole = tuple(sorted(int(i) for i in rng.choice(n, size=int(rng.integers(1, n)),
                                                  replace=False)))
  model = base.clone(whole=whole)
  x = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (2, 8, 8, 3))
  variables = flax.core.unfreeze(jax.jit(lambda k: model.init(
      k, x, train=False, tau=1.0, key=jax.random.key(0)))(jax.random.key(0)))
  cands = model.conv_candidates()
  for i, (a, c, full) in enumerate(zip(model.width_logits(variables["arch"]), cands,
                                       model.full_widths())):
    assert (c == (full,)) == (i in whole) and a.shape == (len(c),)
  selections, _ = jax.jit(lambda a: model.sample(a, 1.0, jax.random.key(1)))(
      variables["arch"])
  for i in whole:
    np.testing.assert_array_equal(selections[i].widths, [cands[i][0]] * 2)
    np.testing.assert_array_equal(selections[i].weights, [1.0, 0.0])

  def loss(arch):
    logits, _ = model.apply({**variables, "arch": arch}, x, train=True, tau=1.0,
                            key=jax.random.key(3), mutable=["batch_stats"])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 1])
  grads = model.width_logits(jax.jit(jax.grad(loss))(variables["arch"]))
  for i, g in enumerate(grads):
    assert np.all(np.isfinite(g)) and (np.all(np.asarray(g) == 0) == (i in whole)), i

  # Random weights and statistics; the widest candidate forced: the plain network.
  variables["params"] = jax.tree.map(
      lambda v: rng.normal(size=v.shape).astype(np.float32) * 0.5, variables["params"])
  variables["batch_stats"] = jax.tree.map(
      lambda v: rng.uniform(0.5, 2, v.shape).astype(np.float32), variables["batch_stats"])
  _identity_shortcut_bn(variables)  # the search-only BN after a shortcut conv
  variables["arch"] = _arch_tree(model, _one_hot_last, _one_hot_last)
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda v: model.apply(v, x, train=False, tau=0.1,
                                           key=jax.random.key(5)))(variables)
    plain = models.cifar_resnet(8)
    plain_vars = _plain_variables_from_search(
        model, variables, _abstract_init(plain, (8, 8, 3))["params"])
    expected = jax.jit(lambda v: plain.apply(v, x, train=False))(plain_vars)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
  assert model.derive(variables["arch"])["widths"] == model.full_widths()
  with pytest.raises(UserError, match="whole="):
    base.clone(whole=(n,)).init(jax.random.key(0), x, train=False, tau=1.0,
                               key=jax.random.key(0))


def test_resnet_space_keeps_narrow_convs_whole_while_the_ratio_is_reachable_by_depth():
  """ResNetSpace with the search's ratio (the backend default's rule): the convs not
  wider than round_to are whole exactly when the others' smallest candidates at the
  smallest depths reach the ratio, counted by flops.count on the plain network; a ratio
  between that edge and the full-depth one keeps them whole (the search reaches it by
  depth), one under it searches them; without a ratio none is whole."""
  rng = np.random.default_rng()
  r = 16
  model = models.tas_cifar_resnet(14, round_to=r)
  shape = (8, 8, 3)
  full = model.full_widths()
  narrow = tuple(i for i, c in enumerate(full) if c <= r)
  smallest = [c if i in narrow else min(cands)
              for i, (c, cands) in enumerate(zip(full, model.conv_candidates()))]

  def count(**kwargs):
    net = models.cifar_resnet(14, **kwargs)
    return flops.count(net, _abstract_init(net, shape), shape)["flops"]
  top = count()
  low, high = (count(widths=smallest, blocks=[min(c) for c in model.stage_candidates()])
               / top, count(widths=smallest) / top)
  assert low < high
  edge = lambda r_: search.ResNetSpace(model, shape, target_ratio=r_)
  assert edge(low * rng.uniform(1.0, 1.02)).model.whole == narrow
  assert edge(rng.uniform(low, high)).model.whole == narrow
  below = edge(low * rng.uniform(0.8, 0.99))
  assert below.model.whole == () and below.whole == []
  kept = edge(high)
  assert kept.whole == ["/".join(model.conv_paths()[i]) for i in narrow]
  assert search.ResNetSpace(model, shape).model.whole == ()
