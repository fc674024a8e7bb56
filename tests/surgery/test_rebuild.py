"""surgery.rebuild: per-leaf slices -> a smaller Linen / NNX network that runs, trains,
initialises at the pruned widths and round-trips through orbax.

Slices are written by hand (no graph). The reference for each pruned network is the
original network with the removed channels made exactly zero (producer kernel and
bias columns zero, and the BN scale and bias of those channels zero, so the channel is
0 whatever its statistics; an attention head with zero output-projection rows adds
nothing), which must give the same output to float32 rounding.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxprune import surgery
from jaxprune.errors import UserError
from jaxprune.models import cifar_resnet, convnet


def _kept(rng, width, frac=0.5):
  n = max(1, int(round(width * (1 - frac))))
  return np.sort(rng.choice(width, n, replace=False))


def _removed(width, kept):
  return np.setdiff1d(np.arange(width), kept)


def _zero(tree, zeros, path_fn):
  """``tree`` with ``zeros = {path: (axis, indices)}`` set to 0 (NumPy copies)."""
  def fn(kp, x):
    x = np.array(x)
    for axis, idx in zeros.get(path_fn(kp), ()):
      index = [slice(None)] * x.ndim
      index[axis] = idx
      x[tuple(index)] = 0
    return x
  return jax.tree_util.tree_map_with_path(fn, tree)


def _linen_path(kp):
  return "/".join(str(k.key) for k in kp)


def _add(d, path, axis, idx):
  d.setdefault(path, []).append((axis, idx))


def _assert_same(a, b):
  if jnp.issubdtype(jnp.result_type(b), jax.dtypes.prng_key):  # NNX's Dropout rng state
    a, b = jax.random.key_data(a), jax.random.key_data(b)
  np.testing.assert_array_equal(a, b)


def _save_restore(tmp_path, tree, target):
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", tree)
  ckpt.wait_until_finished()
  return ckpt.restore(tmp_path / "ckpt", target)


# ---------------------------------------------------------------------------------
# Linen.


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate((6, 5)):
      x = nn.Conv(width, (3, 3), name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4, name="head")(x)


def _randomize(variables, rng):
  """Random BN statistics and scales so the check does not pass by accident."""
  def fn(kp, x):
    name = _linen_path(kp)
    if name.endswith("var"):
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    if name.endswith(("mean", "scale")) or name.endswith("bias"):
      return rng.normal(size=x.shape).astype(np.float32)
    return np.asarray(x)
  return jax.tree_util.tree_map_with_path(fn, variables)


def _linen_cnn_case(seed):
  rng = np.random.default_rng(seed)
  model = LinenCNN()
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  variables = _randomize(model.init(jax.random.key(seed), x), rng)
  slices, zeros = {}, {}
  keeps = {}
  for i, width in enumerate((6, 5)):
    keep = keeps[i] = _kept(rng, width)
    gone = _removed(width, keep)
    for path, axis in ((f"params/conv{i}/kernel", 3), (f"params/conv{i}/bias", 0),
                       (f"params/bn{i}/scale", 0), (f"params/bn{i}/bias", 0),
                       (f"batch_stats/bn{i}/mean", 0), (f"batch_stats/bn{i}/var", 0)):
      slices.setdefault(path, {})[axis] = keep
      if "batch_stats" not in path:
        _add(zeros, path, axis, gone)
  slices["params/conv1/kernel"][2] = keeps[0]
  # Flatten: channel c of conv1 is rows c + k * C of the head's kernel.
  rows = np.sort(np.concatenate([keeps[1] + k * 5 for k in range(16)]))
  slices["params/head/kernel"] = {0: rows}
  return model, variables, x, slices, zeros, keeps


@pytest.mark.parametrize("seed", [0, 1])
def test_linen_cnn_pruned_matches_zeroed_original(seed):
  model, variables, x, slices, zeros, keeps = _linen_cnn_case(seed)
  pruned = surgery.rebuild(model, variables, slices, (4, 4, 3))
  masked = _zero(variables, zeros, _linen_path)
  want = model.apply(masked, x)
  got = pruned.model.apply(pruned.variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  v = pruned.variables
  assert v["params"]["conv0"]["kernel"].shape == (3, 3, 3, keeps[0].size)
  assert v["params"]["conv1"]["kernel"].shape == (3, 3, keeps[0].size, keeps[1].size)
  assert v["batch_stats"]["bn1"]["var"].shape == (keeps[1].size,)
  assert v["params"]["head"]["kernel"].shape == (16 * keeps[1].size, 4)
  # The original is untouched and still runs at full width.
  assert model.apply(variables, x).shape == (2, 4)


def test_linen_cnn_init_trains_and_round_trips(tmp_path):
  model, variables, x, slices, _, keeps = _linen_cnn_case(2)
  pruned = surgery.rebuild(model, variables, slices, (4, 4, 3))
  fresh = pruned.model.init(jax.random.key(3), x)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, pruned.variables)

  params, stats = pruned.variables["params"], pruned.variables["batch_stats"]
  tx = optax.sgd(0.1)
  opt = tx.init(params)
  y = jnp.array([0, 3])

  @jax.jit
  def step(params, stats, opt):
    def loss_fn(p):
      logits, upd = pruned.model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                       mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt, loss

  new_params, new_stats, opt, loss = step(params, stats, opt)
  assert np.isfinite(loss)
  assert not np.allclose(new_params["conv1"]["kernel"], params["conv1"]["kernel"])
  trained = {"params": new_params, "batch_stats": new_stats}
  # The restore target comes from the pruned module alone.
  target = jax.eval_shape(lambda: pruned.model.init(jax.random.key(0), x))
  restored = _save_restore(tmp_path, trained, target)
  jax.tree.map(np.testing.assert_array_equal, restored, trained)
  np.testing.assert_array_equal(pruned.model.apply(restored, x),
                                pruned.model.apply(trained, x))


class LinenMLP(nn.Module):
  hidden: tuple = (12, 10)

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"fc{i}")(x))
    return nn.Dense(3, name="out")(x)


def _mlp_slices(rng, widths, names, last):
  slices, zeros, keeps = {}, {}, []
  for i, (width, name) in enumerate(zip(widths, names)):
    keep = _kept(rng, width, 0.4)
    keeps.append(keep)
    slices.setdefault(f"params/{name}/kernel", {})[1] = keep
    slices[f"params/{name}/bias"] = {0: keep}
    _add(zeros, f"params/{name}/kernel", 1, _removed(width, keep))
    _add(zeros, f"params/{name}/bias", 0, _removed(width, keep))
    nxt = names[i + 1] if i + 1 < len(names) else last
    slices.setdefault(f"params/{nxt}/kernel", {})[0] = keep
  return slices, zeros, keeps


def test_linen_mlp_matches_zeroed_original_and_inits_small():
  rng = np.random.default_rng(4)
  model = LinenMLP()
  x = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  variables = jax.tree.map(np.asarray, model.init(jax.random.key(4), x))
  variables = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32),
                           variables)  # non-zero biases
  slices, zeros, keeps = _mlp_slices(rng, (12, 10), ("fc0", "fc1"), "out")
  pruned = surgery.rebuild(model, variables, slices, (7,))
  np.testing.assert_allclose(pruned.model.apply(pruned.variables, x),
                             model.apply(_zero(variables, zeros, _linen_path), x),
                             rtol=1e-5, atol=1e-5)
  fresh = pruned.model.init(jax.random.key(0), x)["params"]
  assert fresh["fc0"]["kernel"].shape == (7, keeps[0].size)
  assert fresh["fc1"]["kernel"].shape == (keeps[0].size, keeps[1].size)
  assert fresh["out"]["kernel"].shape == (keeps[1].size, 3)
  assert model.hidden == (12, 10)  # the user's module is not changed
  assert pruned.shapes["params/fc0/bias"] == ((12,), (keeps[0].size,))


def test_linen_attention_heads_pruned():
  rng = np.random.default_rng(5)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16,
                                                 name="attn")(x)

  model = Block()
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  variables = model.init(jax.random.key(5), x)
  heads = np.array([0, 2, 3])
  slices = {f"params/attn/{n}/kernel": {1: heads} for n in ("query", "key", "value")}
  slices.update({f"params/attn/{n}/bias": {0: heads} for n in ("query", "key", "value")})
  slices["params/attn/out/kernel"] = {0: heads}
  pruned = surgery.rebuild(model, variables, slices, (5, 8))
  masked = _zero(variables, {"params/attn/out/kernel": [(0, np.array([1]))]}, _linen_path)
  np.testing.assert_allclose(pruned.model.apply(pruned.variables, x),
                             model.apply(masked, x), rtol=1e-5, atol=1e-5)
  fresh = pruned.model.init(jax.random.key(1), x)["params"]["attn"]
  assert fresh["query"]["kernel"].shape == (8, 3, 4)
  assert fresh["out"]["kernel"].shape == (3, 4, 8)


class UserLayer(nn.Module):
  """A layer whose parameter shapes come from its own attributes."""
  dim: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    w1 = self.param("w1", nn.initializers.lecun_normal(), (self.dim, self.hidden))
    w2 = self.param("w2", nn.initializers.lecun_normal(), (self.hidden, self.dim))
    return x + jax.nn.relu(x @ w1) @ w2


def test_linen_user_layer_attributes_inferred():
  rng = np.random.default_rng(6)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return UserLayer(dim=6, hidden=6, name="block")(x)

  model = Net()
  x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  variables = model.init(jax.random.key(6), x)
  keep = np.array([1, 2, 5])
  slices = {"params/block/w1": {1: keep}, "params/block/w2": {0: keep}}
  pruned = surgery.rebuild(model, variables, slices, (6,))
  masked = _zero(variables, {"params/block/w1": [(1, np.array([0, 3, 4]))]}, _linen_path)
  np.testing.assert_allclose(pruned.model.apply(pruned.variables, x),
                             model.apply(masked, x), rtol=1e-5, atol=1e-5)
  fresh = pruned.model.init(jax.random.key(0), x)["params"]["block"]
  assert fresh["w1"].shape == (6, 3) and fresh["w2"].shape == (3, 6)


def test_linen_user_layer_unresolvable_is_one_clear_error():
  class Odd(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 2 * self.width))
      return x @ w

  model = Odd(width=4)
  x = jnp.ones((1, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(UserError, match=r"layer '<model>' \(Odd\).*params/w.*overrides="):
    surgery.rebuild(model, variables, {"params/w": {1: np.array([0, 1, 2])}}, (3,))
  # With the attribute given, it works.
  pruned = surgery.rebuild(model, variables, {"params/w": {1: np.array([0, 1])}}, (3,),
                           overrides={"": {"width": 1}})
  assert pruned.model.init(jax.random.key(0), x)["params"]["w"].shape == (3, 2)


def test_linen_jaxprune_convnet_through_the_same_mechanism():
  rng = np.random.default_rng(7)
  model = convnet(num_classes=3, features=(4, 6), kernels=(3, 3), pools=(True, True),
                  hidden=(5,))
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = _randomize(model.init(jax.random.key(7), x, train=False), rng)
  keep1, keep2 = np.array([0, 3]), np.array([1, 2, 4])
  slices = {}
  zeros = {}
  for i, (width, keep) in enumerate(((4, keep1), (6, keep2)), start=1):
    for path in (f"params/conv{i}/kernel", f"params/bn{i}/scale", f"params/bn{i}/bias",
                 f"batch_stats/bn{i}/mean", f"batch_stats/bn{i}/var"):
      axis = 3 if path.endswith("kernel") else 0
      slices.setdefault(path, {})[axis] = keep
      if "params" in path:
        _add(zeros, path, axis, _removed(width, keep))
  slices["params/conv2/kernel"][2] = keep1
  rows = np.sort(np.concatenate([keep2 + k * 6 for k in range(4)]))
  slices["params/fc1/kernel"] = {0: rows}
  pruned = surgery.rebuild(model, variables, slices, (8, 8, 3))
  masked = _zero(variables, zeros, _linen_path)
  np.testing.assert_allclose(pruned.model.apply(pruned.variables, x, train=False),
                             model.apply(masked, x, train=False),
                             rtol=1e-5, atol=1e-5)
  fresh = pruned.model.init(jax.random.key(0), x, train=False)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, pruned.variables)


@pytest.mark.slow
def test_linen_jaxprune_resnet_inner_widths_keep_the_block_structure():
  rng = np.random.default_rng(9)
  model = cifar_resnet(20, num_classes=3)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = _randomize(model.init(jax.random.key(9), x, train=False), rng)
  slices, zeros = {}, {}
  for stage, width in enumerate((16, 32, 64)):
    for b in range(3):
      blk = f"stage{stage}_block{b}"
      keep = _kept(rng, width)
      for path, axis in ((f"params/{blk}/conv_a/kernel", 3),
                         (f"params/{blk}/bn_a/scale", 0), (f"params/{blk}/bn_a/bias", 0),
                         (f"batch_stats/{blk}/bn_a/mean", 0),
                         (f"batch_stats/{blk}/bn_a/var", 0),
                         (f"params/{blk}/conv_b/kernel", 2)):
        slices[path] = {axis: keep}
        if path.startswith("params") and "conv_b" not in path:
          _add(zeros, path, axis, _removed(width, keep))
  pruned = surgery.rebuild(model, variables, slices, (8, 8, 3))
  masked = _zero(variables, zeros, _linen_path)
  np.testing.assert_allclose(pruned.model.apply(pruned.variables, x, train=False),
                             model.apply(masked, x, train=False),
                             rtol=1e-4, atol=1e-5)
  # Same blocks and shortcuts as the original (the module's widths are untouched).
  assert "shortcut_conv" in pruned.variables["params"]["stage1_block0"]
  fresh = jax.eval_shape(lambda: pruned.model.init(jax.random.key(0), x, train=False))
  assert (jax.tree.map(lambda a: a.shape, fresh)
          == jax.tree.map(np.shape, pruned.variables))


class SetupBlock(nn.Module):
  """setup-defined layers: a 1x1 conv, a depthwise conv, a transposed conv."""

  def setup(self):
    self.c1 = nn.Conv(6, (1, 1))
    self.dw = nn.Conv(6, (3, 3), feature_group_count=6)
    self.up = nn.ConvTranspose(4, (2, 2), strides=(2, 2))

  def __call__(self, x):
    return self.up(nn.relu(self.dw(nn.relu(self.c1(x)))))


class RematNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.remat(SetupBlock)(name="blk")(x)
    return nn.Dense(2, name="head")(x.mean((1, 2)))


def test_linen_depthwise_transpose_setup_and_remat():
  rng = np.random.default_rng(10)
  model = RematNet()
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  variables = jax.tree.map(lambda a: np.asarray(a) + 0.1,
                           model.init(jax.random.key(0), x))
  k, k2 = np.array([0, 2, 5]), np.array([1, 3])
  slices = {"params/blk/c1/kernel": {3: k}, "params/blk/c1/bias": {0: k},
            "params/blk/dw/kernel": {3: k}, "params/blk/dw/bias": {0: k},
            "params/blk/up/kernel": {2: k, 3: k2}, "params/blk/up/bias": {0: k2},
            "params/head/kernel": {0: k2}}
  gone, gone2 = _removed(6, k), _removed(4, k2)
  zeros = {"params/blk/c1/kernel": [(3, gone)], "params/blk/c1/bias": [(0, gone)],
           "params/blk/dw/bias": [(0, gone)],  # the depthwise conv is in the group
           "params/blk/up/kernel": [(3, gone2)], "params/blk/up/bias": [(0, gone2)]}
  pruned = surgery.rebuild(model, variables, slices, (4, 4, 3))
  np.testing.assert_allclose(pruned.model.apply(pruned.variables, x),
                             model.apply(_zero(variables, zeros, _linen_path), x),
                             rtol=1e-5, atol=1e-5)
  fresh = pruned.model.init(jax.random.key(1), x)["params"]["blk"]
  assert fresh["dw"]["kernel"].shape == (3, 3, 1, 3)
  assert fresh["up"]["kernel"].shape == (2, 2, 3, 2)


class NNXSeq(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(10, 6, rngs=rngs)
    self.c1 = nnx.Conv(6, 6, (1,), rngs=rngs)
    self.dw = nnx.Conv(6, 12, (3,), feature_group_count=6, rngs=rngs)  # multiplier 2
    self.up = nnx.ConvTranspose(12, 4, (2,), strides=(2,), rngs=rngs)

  def __call__(self, tokens):
    return self.up(self.dw(self.c1(self.emb(tokens))))


def test_nnx_embed_depthwise_and_transpose_attributes():
  model = NNXSeq(nnx.Rngs(0))
  kept = np.array([0, 2, 4])
  kept_dw = np.sort(np.concatenate([kept * 2, kept * 2 + 1]))  # a kept group's 2 outputs
  slices = {"emb/embedding": {1: kept}, "c1/kernel": {1: kept, 2: kept},
            "c1/bias": {0: kept},
            "dw/kernel": {2: kept_dw}, "dw/bias": {0: kept_dw}, "up/kernel": {1: kept_dw}}
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  small = surgery.rebuild(model, None, slices, tokens).model
  assert small(jnp.array([[1, 2, 3, 4]])).shape == (1, 8, 4)
  assert (small.emb.num_embeddings, small.emb.features) == (10, 3)
  dw, up = small.dw, small.up
  assert (dw.in_features, dw.out_features, dw.feature_group_count) == (3, 6, 3)
  assert (up.in_features, up.out_features, up.kernel_shape) == (6, 4, (2, 6, 4))


def test_bad_slices_are_errors():
  model = LinenMLP()
  x = jnp.ones((1, 7))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(UserError, match="no leaf 'params/fc9/kernel'.*params/fc0/bias"):
    surgery.rebuild(model, variables, {"params/fc9/kernel": {1: np.array([0])}}, (7,))
  with pytest.raises(UserError, match="sorted, unique"):
    surgery.rebuild(model, variables, {"params/fc0/kernel": {1: np.array([3, 1])}}, (7,))
  # fc0 narrower but fc1's input axis is not sliced.
  with pytest.raises(UserError, match="not consistent: layer 'fc1' \\(Dense\\)"):
    surgery.rebuild(model, variables, {"params/fc0/kernel": {1: np.array([0, 1])},
                                       "params/fc0/bias": {0: np.array([0, 1])}}, (7,))


# ---------------------------------------------------------------------------------
# NNX.


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.conv2 = nnx.Conv(6, 5, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(5, rngs=rngs)
    self.linear = nnx.Linear(4 * 4 * 5, 3, rngs=rngs)

  def __call__(self, x):
    x = self.dropout(nnx.relu(self.bn1(self.conv1(x))))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.linear(x.reshape(x.shape[0], -1))


def _nnx_randomize(model, rng):
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and path[-1] in ("scale", "bias", "mean", "var"):
      shape = var[...].shape
      value = (rng.uniform(0.5, 2.0, shape) if path[-1] == "var"
               else rng.normal(size=shape))
      var[...] = jnp.asarray(value, jnp.float32)


def _nnx_zero(model, zeros):
  masked = nnx.clone(model)
  for path, var in nnx.iter_graph(masked):
    name = "/".join(map(str, path))
    if isinstance(var, nnx.Variable) and name in zeros:
      x = np.array(var[...])
      for axis, idx in zeros[name]:
        index = [slice(None)] * x.ndim
        index[axis] = idx
        x[tuple(index)] = 0
      var[...] = jnp.asarray(x)
  return masked


def _nnx_cnn_case(seed):
  rng = np.random.default_rng(seed)
  model = NNXCNN(nnx.Rngs(seed))
  _nnx_randomize(model, rng)
  keeps = {1: _kept(rng, 6), 2: _kept(rng, 5)}
  slices, zeros = {}, {}
  for i, width in ((1, 6), (2, 5)):
    for path, axis in ((f"conv{i}/kernel", 3), (f"conv{i}/bias", 0), (f"bn{i}/scale", 0),
                       (f"bn{i}/bias", 0), (f"bn{i}/mean", 0), (f"bn{i}/var", 0)):
      slices.setdefault(path, {})[axis] = keeps[i]
      if not path.endswith(("mean", "var")):
        _add(zeros, path, axis, _removed(width, keeps[i]))
  slices["conv2/kernel"][2] = keeps[1]
  slices["linear/kernel"] = {0: np.sort(np.concatenate([keeps[2] + k * 5
                                                         for k in range(16)]))}
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  return model, x, slices, zeros, keeps


@pytest.mark.parametrize("seed", [0, 1])
def test_nnx_cnn_pruned_matches_zeroed_original(seed):
  model, x, slices, zeros, keeps = _nnx_cnn_case(seed)
  pruned = surgery.rebuild(model, None, slices, (4, 4, 3))
  assert pruned.variables is None and pruned.model is not model
  small = pruned.model
  small.eval()
  masked = _nnx_zero(model, zeros)
  masked.eval()
  np.testing.assert_allclose(small(x), masked(x), rtol=1e-5, atol=1e-5)
  k1, k2 = keeps[1].size, keeps[2].size
  assert small.conv1.out_features == small.conv2.in_features == k1
  assert small.conv2.out_features == k2
  assert small.conv2.kernel_shape == (3, 3, k1, k2) == small.conv2.kernel[...].shape
  assert (small.bn1.num_features, small.bn2.num_features) == (k1, k2)
  assert small.linear.in_features == 16 * k2 and small.linear.out_features == 3
  # The original is untouched.
  assert model.conv1.out_features == 6 and model.conv1.kernel[...].shape == (3, 3, 3, 6)
  assert model.bn1.mean[...].shape == (6,)


def test_nnx_cnn_trains_and_round_trips(tmp_path):
  model, x, slices, _, _ = _nnx_cnn_case(2)
  small = surgery.rebuild(model, None, slices, (4, 4, 3)).model
  small.train()
  optimizer = nnx.Optimizer(small, optax.adam(1e-2), wrt=nnx.Param)
  y = jnp.array([0, 2])

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  before = np.asarray(small.conv2.kernel[...])
  mean_before = np.asarray(small.bn2.mean[...])
  loss = step(small, optimizer, x, y)
  assert np.isfinite(loss)
  assert not np.allclose(small.conv2.kernel[...], before)
  assert not np.allclose(small.bn2.mean[...], mean_before)

  state = nnx.state(small)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = _save_restore(tmp_path, state, target)
  jax.tree.map(_assert_same, nnx.to_pure_dict(restored), nnx.to_pure_dict(state))
  # Restore into a second rebuild of the same slices (a fresh process's route).
  other = surgery.rebuild(model, None, slices).model
  nnx.update(other, restored)
  small.eval()
  other.eval()
  np.testing.assert_array_equal(other(x), small(x))


class NNXAttentionBlock(nnx.Module):
  def __init__(self, rngs, dim=8, heads=4, hidden=12):
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, qkv_features=16,
                                       decode=False, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    return x + self.fc2(nnx.gelu(self.fc1(self.norm(x))))


def test_nnx_attention_heads_and_mlp_pruned():
  rng = np.random.default_rng(8)
  model = NNXAttentionBlock(nnx.Rngs(8))
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and path[-1] == "bias":
      var[...] = jnp.asarray(rng.normal(size=var[...].shape), jnp.float32)
  heads = np.array([0, 3])
  hidden = _kept(rng, 12)
  slices = {f"attn/{n}/kernel": {1: heads} for n in ("query", "key", "value")}
  slices.update({f"attn/{n}/bias": {0: heads} for n in ("query", "key", "value")})
  slices["attn/out/kernel"] = {0: heads}
  slices.update({"fc1/kernel": {1: hidden}, "fc1/bias": {0: hidden},
                 "fc2/kernel": {0: hidden}})
  pruned = surgery.rebuild(model, None, slices, (5, 8))
  masked = _nnx_zero(model, {"attn/out/kernel": [(0, np.array([1, 2]))],
                             "fc1/kernel": [(1, _removed(12, hidden))],
                             "fc1/bias": [(0, _removed(12, hidden))]})
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  small = pruned.model
  np.testing.assert_allclose(small(x), masked(x), rtol=1e-5, atol=1e-5)
  attn = small.attn
  assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (2, 2, 4)
  assert attn.qkv_features == 8
  assert (attn.in_features, attn.out_features) == (8, 8)
  assert attn.query.out_features == (2, 4) and attn.out.in_features == (2, 4)
  assert small.fc1.out_features == small.fc2.in_features == hidden.size

  optimizer = nnx.Optimizer(small, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  before = np.asarray(small.attn.query.kernel[...])
  assert np.isfinite(step(small, optimizer, x))
  assert not np.allclose(small.attn.query.kernel[...], before)


def test_nnx_user_module_stale_attribute_warns():
  class Mine(nnx.Module):
    def __init__(self, rngs):
      self.hidden = 6
      self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 6)))

    def __call__(self, x):
      return x @ self.w[...]

  with pytest.warns(UserWarning, match="hidden"):
    pruned = surgery.rebuild(Mine(nnx.Rngs(0)), None, {"w": {1: np.array([0, 2])}}, (4,))
  assert pruned.stale == {"": ("hidden",)}
  fixed = surgery.rebuild(Mine(nnx.Rngs(0)), None, {"w": {1: np.array([0, 2])}}, (4,),
                          overrides={"": {"hidden": 2}})
  assert fixed.model.hidden == 2 and not fixed.stale


class _NnxResidualIfSameWidth(nnx.Module):
  """Adds its input only when its output is as wide as ``self.out``: an int attribute
  compared with a width decides the structure (the residual)."""

  def __init__(self, c, rngs):
    self.a, self.b, self.out = nnx.Linear(c, c, rngs=rngs), nnx.Linear(c, c, rngs=rngs), c

  def __call__(self, x):
    h = self.b(nnx.relu(self.a(x)))
    return h + x if h.shape[-1] == self.out else h


class _NnxResidualNet(nnx.Module):
  def __init__(self, rngs):
    self.inp = nnx.Linear(5, 8, rngs=rngs)
    self.blk = _NnxResidualIfSameWidth(8, rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.blk(nnx.relu(self.inp(x))))


class _NnxReluAtEight(nnx.Module):
  """Applies its ReLU only at the width 8 (a constant): no attribute can restore it."""

  def __init__(self, rngs):
    self.fc, self.out = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    h = self.fc(x)
    return self.out(nnx.relu(h) if h.shape[-1] == 8 else h)


def _zeroed(model, layers, gone):
  """A copy of ``model`` whose ``layers`` (attribute paths) output zeros at ``gone``."""
  ref = nnx.clone(model)
  for path in layers:
    layer = ref
    for name in path.split("/"):
      layer = getattr(layer, name)
    k, b = np.array(layer.kernel[...]), np.array(layer.bias[...])
    k[:, gone], b[gone] = 0, 0
    layer.kernel.set_value(jnp.asarray(k))
    layer.bias.set_value(jnp.asarray(b))
  return ref


def test_nnx_structure_check_derives_attributes_or_refuses_in_one_line():
  """An NNX network whose residual a width comparison decides (``h.shape[-1] ==
  self.out``): pruning the residual stream would drop the residual. The rebuild compares
  the primitives it runs with the original's and sets the int attribute equal to the
  removed size to the new one (as Linen's are derived), so the smaller network equals the
  original with those channels zeroed (fresh random weights, widths and input); an
  explicit override gives the same network. A layer whose graph changes with a constant
  (no attribute restores it) is refused in one line."""
  rng = np.random.default_rng()
  model = _NnxResidualNet(nnx.Rngs(int(rng.integers(1 << 30))))
  kept = np.sort(rng.choice(8, int(rng.integers(2, 8)), replace=False))
  stream = {"inp/kernel": {1: kept}, "inp/bias": {0: kept}, "blk/a/kernel": {0: kept},
            "blk/b/kernel": {1: kept}, "blk/b/bias": {0: kept}, "head/kernel": {0: kept}}
  x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  ref = _zeroed(model, ["inp", "blk/b"], np.setdiff1d(np.arange(8), kept))(x)
  derived = surgery.rebuild(model, None, stream, (5,))
  assert derived.model.blk.out == kept.size and model.blk.out == 8 and not derived.stale
  given = surgery.rebuild(model, None, stream, (5,),
                          overrides={"blk": {"out": int(kept.size)}}).model
  for small in (derived.model, given):
    np.testing.assert_allclose(small(x), ref, rtol=1e-5, atol=1e-5)
  other = _NnxReluAtEight(nnx.Rngs(0))
  narrow = np.sort(rng.choice(8, int(rng.integers(1, 8)), replace=False))
  with pytest.raises(UserError, match="another graph") as e:
    surgery.rebuild(other, None, {"fc/kernel": {1: narrow}, "fc/bias": {0: narrow},
                                  "out/kernel": {0: narrow}}, (5,))
  assert "\n" not in str(e.value) and "operation" in str(e.value)


def test_nnx_untraceable_forward_is_rebuilt_as_before():
  """A forward with Python control flow on values runs eagerly but cannot be traced: the
  structure check is skipped for it (the rebuild only runs it, as before the check), and
  the smaller network equals the original with those channels zeroed."""
  class Branchy(nnx.Module):
    def __init__(self, rngs):
      self.fc, self.out = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      h = self.fc(x)
      if float(jnp.abs(h).sum()) >= 0:  # a concrete value: eager only
        h = nnx.relu(h)
      return self.out(h)

  rng = np.random.default_rng()
  model = Branchy(nnx.Rngs(int(rng.integers(1 << 30))))
  kept = np.sort(rng.choice(8, int(rng.integers(1, 8)), replace=False))
  small = surgery.rebuild(model, None, {"fc/kernel": {1: kept}, "fc/bias": {0: kept},
                                        "out/kernel": {0: kept}}, (5,)).model
  x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  ref = _zeroed(model, ["fc"], np.setdiff1d(np.arange(8), kept))
  np.testing.assert_allclose(small(x), ref(x), rtol=1e-5, atol=1e-5)
