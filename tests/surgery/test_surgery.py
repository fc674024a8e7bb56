"""Channel surgery: zero-gamma channels removed, constants folded, masked == shrunk."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import sweep
from jaxprune import flops, models, surgery
from jaxprune.errors import UserError

SHAPE = (16, 16, 3)


def _models():
  return {"resnet8": models.cifar_resnet(8),
          "bottleneck11": models.cifar_resnet(11, block="bottleneck"),
          "convnet": models.convnet(features=(12, 16, 10), hidden=(24,))}


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _prepare(model, rng, *, zero_fraction=0.4, positive_beta=True, all_zero=None):
  """Random BN numbers, a random fraction of prunable gammas set to exactly 0."""
  v = jax.tree.map(np.array, model.init(jax.random.key(int(rng.integers(1 << 30))),
                                        jnp.zeros((1, *SHAPE)), train=False))

  def walk(p, s):
    for k, node in p.items():
      if isinstance(node, dict) and "scale" in node:
        c = node["scale"].shape[0]
        node["scale"] = rng.normal(size=c).astype(np.float32)
        beta = np.abs(rng.normal(size=c)) * 0.5
        node["bias"] = (beta if positive_beta else -beta).astype(np.float32)
        s[k]["mean"] = rng.normal(size=c).astype(np.float32) * 0.1
        s[k]["var"] = rng.uniform(0.5, 2, size=c).astype(np.float32)
      elif isinstance(node, dict):
        walk(node, s.get(k, {}))
  walk(v["params"], v["batch_stats"])
  for path in surgery.ista_scales(model, v, SHAPE):
    bn = _get(v["params"], path.rsplit("/", 1)[0])
    zero = rng.random(bn["scale"].shape) < zero_fraction
    if all_zero is not None and path.startswith(all_zero):
      zero[:] = True
    bn["scale"] = np.where(zero, 0, bn["scale"]).astype(np.float32)
  return v


def _probe(rng, n=2):
  return rng.normal(size=(n, *SHAPE)).astype(np.float32)


def _bn_of(label):
  """A jaxprune model's BN after a conv: conv_a -> bn_a, stem_conv -> stem_bn, conv1 -> bn1."""
  return label.replace("stem_conv", "stem_bn").replace("conv", "bn")


@pytest.mark.parametrize("name", sweep(["resnet8", "bottleneck11", "convnet"], {"resnet8"}))
def test_shrunk_equals_masked_exactly_when_removed_channels_output_zero(name):
  # beta <= 0: a zero-gamma channel outputs relu(beta) = 0, nothing to fold, so the
  # smaller network must match everywhere, borders included.
  rng = np.random.default_rng()
  model = _models()[name]
  v = _prepare(model, rng, positive_beta=False)
  small = surgery.shrink(model, v, SHAPE)
  assert 0 < small.removed_fraction < 1
  checked, selected = 0, surgery.ista_scales(model, v, SHAPE)
  for label, idx in small.kept.items():
    bn = _bn_of(label)
    try:
      gamma = _get(v["params"], bn)["scale"]
    except KeyError:  # a dense layer without BN: nothing zeroed there
      assert small.widths_after[label] == small.widths_before[label]
      continue
    if f"{bn}/scale" in selected:
      np.testing.assert_array_equal(idx, np.flatnonzero(gamma))
      checked += 1
    else:  # the residual stream: ISTA leaves it alone, so does shrink
      assert idx.size == gamma.size
  assert checked >= 3
  x = _probe(rng)
  ref = np.asarray(model.apply(v, x, train=False))
  out = np.asarray(small.model.apply(small.variables, x, train=False))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet8", "bottleneck11", "convnet"])
def test_folded_constants_make_interior_pixels_equal(name):
  rng = np.random.default_rng()
  model = _models()[name]
  v = _prepare(model, rng, positive_beta=True)
  small = surgery.shrink(model, v, SHAPE)
  report = surgery.check_equivalence(model, v, small, _probe(rng))
  print(name, report)  # the border difference, measured (pytest -s shows it)
  assert small.folds  # relu(beta) > 0 was folded somewhere
  assert report["interior_max_abs_diff"] <= 2e-5 * report["activation_max_abs"]
  assert report["border_max_abs_diff"] > 1e-3  # padding meets relu(beta) > 0
  # Without the fold the interior is wrong too: the fold is what makes it exact.
  unfolded = surgery.shrink(model, v, SHAPE, fold_constants=False)
  worse = surgery.check_equivalence(model, v, unfolded, _probe(rng))
  assert worse["interior_max_abs_diff"] > 1e-3


def test_the_fold_is_the_closed_form_on_a_conv_then_dense():
  """conv -> BN(gamma 0 on channel c) -> relu -> flatten -> dense: the dense bias gains
  sum_p W[p * C + c, :] * relu(beta_c), computed here by hand."""
  rng = np.random.default_rng()
  model = models.convnet(features=(6,), kernels=(3,), pools=(False,), hidden=())
  v = _prepare(model, rng, zero_fraction=0.0)
  c = int(rng.integers(6))
  v["params"]["bn1"]["scale"][c] = 0.0
  small = surgery.shrink(model, v, SHAPE)
  assert small.kept["conv1"].tolist() == [i for i in range(6) if i != c]
  dense = [k for k in small.folds]
  assert len(dense) == 1 and small.folds[dense[0]]["into"].endswith("/bias")
  kernel = np.asarray(_get(v["params"], dense[0].split("/", 1)[1].rsplit("/", 1)[0])["kernel"])
  value = max(float(v["params"]["bn1"]["bias"][c]), 0.0)
  # The flattened map (no pooling): channel c is rows c, c + 6, c + 12, ...
  rows = np.arange(c, kernel.shape[0], 6)
  want = kernel[rows].sum(0) * value
  np.testing.assert_allclose(small.folds[dense[0]]["delta"], want, rtol=1e-5, atol=1e-6)
  x = _probe(rng)
  np.testing.assert_allclose(small.model.apply(small.variables, x, train=False),
                             model.apply(v, x, train=False), rtol=1e-4, atol=1e-5)


def test_only_the_scales_ista_selects_change_width_and_counts_drop():
  rng = np.random.default_rng()
  model = models.cifar_resnet(8)
  v = _prepare(model, rng)
  small = surgery.shrink(model, v, SHAPE)
  inside = {s.rsplit("/", 1)[0].replace("bn", "conv") for s in surgery.ista_scales(model, v,
                                                                                    SHAPE)}
  assert inside == {"stage0_block0/conv_a", "stage1_block0/conv_a", "stage2_block0/conv_a"}
  for label in small.widths_before:
    if label not in inside:  # the residual stream keeps its channels
      assert small.widths_after[label] == small.widths_before[label]
    kernel = _get(small.variables["params"], label)["kernel"]
    assert kernel.shape[-1] == max(small.widths_after[label], 1)
  before = flops.count(model, v, SHAPE)
  after = flops.count(small.model, small.variables, SHAPE)
  assert after["params"] < before["params"] and after["flops"] < before["flops"]


def test_a_resnet_block_whose_gammas_all_reach_zero_keeps_a_placeholder():
  rng = np.random.default_rng()
  model = models.cifar_resnet(8)
  v = _prepare(model, rng, all_zero="stage1_block0/bn_a")
  small = surgery.shrink(model, v, SHAPE)
  assert small.widths_after["stage1_block0/conv_a"] == 0
  kernel = small.variables["params"]["stage1_block0"]["conv_a"]["kernel"]
  assert kernel.shape[-1] == 1  # the placeholder
  np.testing.assert_array_equal(small.variables["params"]["stage1_block0"]["conv_b"]["kernel"],
                                0.0)  # read with zero weights
  report = surgery.check_equivalence(model, v, small, _probe(rng))
  assert report["interior_max_abs_diff"] <= 2e-5 * report["activation_max_abs"]


def test_an_all_zero_layer_in_a_plain_stack_removes_dead_channels_recursively():
  # bn2 all zero: conv3's filters read nothing (constant, folded into fc1), no surviving
  # filter reads conv1, and then fc1 reads nothing (its bias, folded into the classifier):
  # every unit goes.
  rng = np.random.default_rng()
  model = _models()["convnet"]
  v = _prepare(model, rng, positive_beta=False, all_zero="bn2")
  small = surgery.shrink(model, v, SHAPE)
  assert small.widths_after == {"conv1": 0, "conv2": 0, "conv3": 0, "fc1": 0}
  assert small.rounds >= 3
  assert "conv3" in small.cascaded or "fc1" in small.cascaded
  x = _probe(rng)
  ref = np.asarray(model.apply(v, x, train=False))
  out = np.asarray(small.model.apply(small.variables, x, train=False))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * max(np.abs(ref).max(), 1))
  np.testing.assert_allclose(ref, ref[:1].repeat(len(ref), 0), atol=1e-5)  # constant net


@pytest.mark.slow
def test_a_constant_with_nowhere_to_fold_stays_and_is_reported():
  # The bottleneck's stem feeds a 1x1 projection shortcut with no bias and no BN: a
  # zero-gamma stem channel holding relu(beta) > 0 cannot be folded, so it stays.
  rng = np.random.default_rng()
  model = _models()["bottleneck11"]
  v = _prepare(model, rng, positive_beta=True, zero_fraction=0.0)
  v["params"]["stem_bn"]["scale"][:3] = 0.0
  small = surgery.shrink(model, v, SHAPE)
  assert small.widths_after["stem_conv"] == small.widths_before["stem_conv"]
  assert "shortcut_conv" in small.unfoldable["stem_conv"]


def test_shrink_needs_values():
  model = _models()["convnet"]
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)),
                                               train=False))
  with pytest.raises(UserError, match="abstract"):
    surgery.shrink(model, abstract, SHAPE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg", "resnet_basic"])
def test_ista_surgery_is_the_same_for_the_linen_and_nnx_twins(name):
  """ista_scales, ista_rho, shrink, check_equivalence and rescale_gamma on a zoo model
  written independently in Linen and in NNX (same values): same selections, numbers."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from zoo import BY_NAME, init_linen, init_nnx, nnx_from_linen  # pylint: disable=g-import-not-at-top
  arch = BY_NAME[name]
  shape = arch.input_shape
  rng = np.random.default_rng()
  model, v = init_linen(arch, seed=int(rng.integers(1 << 16)))
  twin = init_nnx(arch)
  nnx_from_linen(twin, v)
  scales = surgery.ista_scales(model, v, shape)
  assert scales and surgery.ista_scales(twin, None, shape) == scales
  assert surgery.ista_rho(twin, None, shape) == surgery.ista_rho(model, v, shape)

  zero = {s: rng.random(_get(v["params"], s).shape) < 0.4 for s in scales}
  v = jax.tree_util.tree_map_with_path(
      lambda p, x: np.where(zero[k], 0.0, x).astype(np.float32)
      if (k := "/".join(str(q.key) for q in p[1:])) in zero and p[0].key == "params" else x, v)
  nnx_from_linen(twin, v)
  small_l = surgery.shrink(model, v, shape)
  small_n = surgery.shrink(twin, None, shape)
  assert small_l.widths_after == small_n.widths_after
  assert 0 < small_l.removed_fraction < 1
  for label, idx in small_l.kept.items():
    np.testing.assert_array_equal(idx, small_n.kept[label])
  x = rng.normal(size=(3, *shape)).astype(np.float32)
  small_n.model.eval()
  np.testing.assert_allclose(small_n.model(x), small_l.model.apply(small_l.variables, x,
                                                                   train=False),
                             rtol=1e-4, atol=1e-5)
  for m, var, small in ((model, v, small_l), (twin, None, small_n)):
    report = surgery.check_equivalence(m, var, small, x)
    assert report["interior_max_abs_diff"] <= 2e-5 * report["activation_max_abs"]

  alpha = {s: float(rng.uniform(0.2, 3)) for s in scales}
  scaled_l = surgery.rescale_gamma(model, v, alpha, shape)
  scaled_n = surgery.rescale_gamma(twin, None, alpha, shape)
  assert isinstance(scaled_n, nnx.Module)
  scaled_n.eval()
  ref = np.asarray(model.apply(v, x, train=False))
  for out in (model.apply(scaled_l, x, train=False), scaled_n(x)):
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.slow
def test_round_to_keeps_widths_multiples_and_the_network_unchanged():
  rng = np.random.default_rng()
  model = _models()["convnet"]  # conv widths 12, 16, 10; hidden 24
  v = _prepare(model, rng, zero_fraction=0.6, positive_beta=True)
  plain = surgery.shrink(model, v, SHAPE)
  rounded = surgery.shrink(model, v, SHAPE, round_to=8)
  for label, w in rounded.widths_after.items():
    full = rounded.widths_before[label]
    assert w == full or w % 8 == 0, (label, w)
    # The smallest multiple of 8 that holds the channels plain shrink keeps.
    assert w == min(full, -(-plain.widths_after[label] // 8) * 8), label
  assert rounded.widths_after != rounded.widths_before
  x = _probe(rng)
  both = [surgery.check_equivalence(model, v, s, x) for s in (plain, rounded)]
  for report in both:
    assert report["interior_max_abs_diff"] <= 2e-5 * report["activation_max_abs"]
  np.testing.assert_allclose(
      np.asarray(rounded.model.apply(rounded.variables, x, train=False)),
      np.asarray(plain.model.apply(plain.variables, x, train=False)), rtol=1e-4, atol=1e-4)
  with pytest.raises(UserError, match="round_to"):
    surgery.shrink(model, v, SHAPE, round_to=0)
