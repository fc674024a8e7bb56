"""Patterns of published model code (issue 22): several inputs through ``call=``, widths
computed from a config or a constant, dead outputs, Linen wrappers, residual blocks whose
parameters sit in a submodule of the branch, collectives over a pmap axis name.

The models are small and written here, independently of jaxprune's own models.
"""
import dataclasses

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import flops, graph, search, surgery
from jaxprune.errors import UserError
from jaxprune.graph import adapters


def _randomize(variables, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, np.shape(a)), a.dtype),
                      variables)


def _zeroed(variables, slices):
  """The masked original: every leaf's removed indices set to zero."""
  flat = {"/".join(str(getattr(k, "key", k)) for k in kp): a
          for kp, a in jax.tree_util.tree_flatten_with_path(variables)[0]}
  out = {}
  for path, a in flat.items():
    a = np.array(a)
    for axis, kept in slices.get(path, {}).items():
      mask = np.zeros(a.shape[axis], bool)
      mask[np.asarray(kept)] = True
      shape = [1] * a.ndim
      shape[axis] = -1
      a = a * mask.reshape(shape)
    out[path] = a
  leaves = [out["/".join(str(getattr(k, "key", k)) for k in kp)]
            for kp, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  return jax.tree.unflatten(jax.tree.structure(variables), leaves)


# --- several inputs: token ids, an attention mask, positions (BERT-style) -----------

L, D, H, F, V, C = 8, 16, 2, 32, 50, 3


class Encoder(nn.Module):
  """Token and position embeddings, masked self-attention, an MLP, a per-token head
  read at the first token."""

  @nn.compact
  def __call__(self, ids, mask, positions):
    h = nn.Embed(V, D, name="tok")(ids) + nn.Embed(L, D, name="pos")(positions)
    a = nn.MultiHeadDotProductAttention(num_heads=H, name="attn")(
        h, mask=mask[:, None, None, :])
    h = h + a
    m = nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(F, name="fc1")(h)))
    return nn.Dense(C, name="head")(h + m)[:, 0]


def _encoder_inputs(rng, n):
  ids = jnp.asarray(rng.integers(0, V, (n, L)), jnp.int32)
  mask = jnp.asarray(rng.random((n, L)) < 0.8).at[:, 0].set(True)
  return {"ids": ids, "mask": mask, "pos": jnp.broadcast_to(jnp.arange(L), (n, L))}


def test_several_inputs_trace_count_and_prune_through_call():
  """input_shape as a pytree of ShapeDtypeStructs and call= reach the graph, the FLOPs
  counter and the rebuild's own check; the pruned MLP gives the masked original's
  logits."""
  rng = np.random.default_rng()
  model = Encoder()
  shapes = {"ids": jax.ShapeDtypeStruct((L,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((L,), jnp.bool_),
            "pos": jax.ShapeDtypeStruct((L,), jnp.int32)}
  x = _encoder_inputs(rng, 3)
  variables = _randomize(model.init(jax.random.key(0), x["ids"], x["mask"], x["pos"]),
                         int(rng.integers(1 << 30)))
  call = lambda v, x: model.apply(v, x["ids"], x["mask"], x["pos"])

  # Hand count (per example): q, k, v and out projections with their bias adds, q.k and
  # attn.v, the MLP, the head on every token.
  want = (4 * (L * D * D + L * D) + 2 * L * L * D + L * D * F + L * F + L * F * D + L * D
          + L * D * C + L * C)
  assert flops.count(model, variables, shapes, call)["flops"] == want

  g = graph.trace(model, variables, shapes, call)
  mlp = [grp for grp in g.prunable() if "params/fc1/kernel" in grp.producers]
  assert len(mlp) == 1 and mlp[0].width == F
  kept = np.sort(rng.choice(F, 8, replace=False))
  small = surgery.prune(model, variables, shapes, {mlp[0].id: kept}, call)
  assert small.shapes["params/fc1/kernel"] == ((D, F), (D, 8))
  masked = _zeroed(variables, graph.kept_slices(g, {mlp[0].id: kept}))
  got = small.model.apply(small.variables, x["ids"], x["mask"], x["pos"])
  np.testing.assert_allclose(got, call(masked, x), rtol=1e-5, atol=1e-5)
  assert flops.count(small.model, small.variables, shapes,
                     lambda v, x: small.model.apply(v, x["ids"], x["mask"], x["pos"])
                     )["flops"] == g.predict({mlp[0].id: kept})["flops"]


def test_bad_input_shape_is_one_line():
  model = Encoder()
  with pytest.raises(UserError, match="input_shape must be one example's shape"):
    graph.trace(model, {"params": {}}, {"ids": "eight"}, lambda v, x: 0)


# --- widths from a config or a constant --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cfg:
  hidden: int = 12


class Embeddings(nn.Module):
  """HF ViT-style: the CLS token's width comes from the config, not from the input."""
  config: Cfg

  @nn.compact
  def __call__(self, x):
    p = nn.Conv(self.config.hidden, (2, 2), (2, 2), name="patch")(x)
    p = p.reshape(p.shape[0], -1, p.shape[-1])
    cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, self.config.hidden))
    return jnp.concatenate([jnp.tile(cls, (p.shape[0], 1, 1)), p], 1)


class TinyViT(nn.Module):
  config: Cfg

  @nn.compact
  def __call__(self, x):
    h = Embeddings(self.config, name="embeddings")(x)
    h = h + nn.Dense(self.config.hidden, name="fc2")(nn.gelu(nn.Dense(24, name="fc1")(h)))
    return nn.Dense(3, name="head")(h[:, 0])


def test_width_from_config_is_one_line_and_overrides_rebuild_it():
  rng = np.random.default_rng()
  model = TinyViT(Cfg(12))
  variables = _randomize(model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3))),
                         int(rng.integers(1 << 30)))
  g = graph.trace(model, variables, (4, 4, 3))
  stream = [grp for grp in g.prunable() if "params/embeddings/cls" in
            [m.path for m in grp.members]]
  assert len(stream) == 1 and stream[0].width == 12
  kept = np.sort(rng.choice(12, 6, replace=False))
  keep = {stream[0].id: kept}
  with pytest.raises(UserError) as e:
    surgery.prune(model, variables, (4, 4, 3), keep)
  msg = str(e.value)
  assert "\n" not in msg and "'embeddings' (Embeddings)" in msg and "'config'" in msg
  assert "overrides=" in msg and "ignore=" in msg

  slices = graph.kept_slices(g, keep)
  small = surgery.rebuild(model, variables, slices, (4, 4, 3),
                          overrides={"embeddings": {"config": Cfg(6)}})
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  np.testing.assert_allclose(small.model.apply(small.variables, x),
                             model.apply(_zeroed(variables, slices), x),
                             rtol=1e-5, atol=1e-5)


class SinusoidalLM(nn.Module):
  """lm1b-style: a fixed sinusoidal table computed in numpy from the width (even
  widths only, as the table interleaves sin and cos)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="embed")(x)
    d = h.shape[-1]
    pos = np.arange(h.shape[1])[:, None]
    div = np.exp(np.arange(0, d, 2) * -(np.log(1e4) / d))
    table = np.zeros((h.shape[1], d), np.float32)
    table[:, 0::2] = np.sin(pos * div)
    table[:, 1::2] = np.cos(pos * div)
    return nn.Dense(2, name="out")(h + table[None])


def test_width_from_a_constant_table_is_one_line():
  model = SinusoidalLM()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 3)))
  slices = {"params/embed/kernel": {1: np.arange(5)}, "params/embed/bias": {0: np.arange(5)},
            "params/out/kernel": {0: np.arange(5)}}
  with pytest.raises(UserError) as e:
    surgery.rebuild(model, variables, slices, (1, 4, 3))
  msg = str(e.value)
  assert "\n" not in msg and "'<model>' (SinusoidalLM)" in msg and "ValueError" in msg


# --- FLOPs of dead code --------------------------------------------------------------


class DeadOutputs(nn.Module):
  """A per-position head whose output the result does not use (big_vision ViT's
  ``logits_2d``) and a layer computed and dropped."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
    head = nn.Dense(5, name="head")
    extras = {"logits_2d": head(h)}
    nn.Dense(7, name="unused")(h)
    return head(h.mean((1, 2))), extras


def test_flops_exclude_dead_code():
  model = DeadOutputs()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
  conv = 6 * 6 * 3 * 3 * 3 * 8 + 6 * 6 * 8
  head = 8 * 5 + 5
  logits_2d = 6 * 6 * (8 * 5 + 5)
  assert flops.count(model, variables, (6, 6, 3))["flops"] == conv + head + logits_2d
  only_logits = lambda v, x: model.apply(v, x)[0]
  assert flops.count(model, variables, (6, 6, 3), only_logits)["flops"] == conv + head
  assert graph.trace(model, variables, (6, 6, 3), only_logits).flops == conv + head


# --- search spaces of wrapped models and submodule blocks ----------------------------


class Branch(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    h = nn.relu(nn.Conv(self.width, (3, 3), use_bias=False, name="conv_a")(x))
    return nn.Conv(self.width, (3, 3), use_bias=False, name="conv_b")(h)


class Layer(nn.Module):
  """HF ResNet-style: the block's parameters all live in its ``layer`` submodule."""
  width: int

  def setup(self):
    self.layer = Branch(self.width)

  def __call__(self, x, deterministic: bool = True):
    return nn.relu(x + self.layer(x, deterministic))


class SubmoduleResNet(nn.Module):
  width: int = 8
  depth: int = 3

  def setup(self):
    self.stem = nn.Conv(self.width, (3, 3), name="stem")
    self.layers = [Layer(self.width, name=str(i)) for i in range(self.depth)]
    self.head = nn.Dense(3, name="head")

  def __call__(self, x, deterministic: bool = True):
    h = nn.relu(self.stem(x))
    for layer in self.layers:
      h = layer(h, deterministic)
    return self.head(h.mean((1, 2)))


class Wrapper(nn.Module):
  """A user's Linen wrapper (no ``train`` argument) whose submodule is named like the
  search space's own wrapper field used to be."""

  @nn.compact
  def __call__(self, x):
    return SubmoduleResNet(name="inner")(x)


def test_search_space_of_a_wrapper_with_blocks_in_a_branch_submodule():
  model = Wrapper()
  variables = _randomize(model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3))), 1)
  space = search.SearchSpace(model, variables, (6, 6, 3))
  assert space.excluded_stages == {}
  assert space.depth_names == ["inner/0..inner/2"]
  arch = space.init_arch(jax.random.key(1))
  arch["depth_logits"]["inner/0..inner/2"] = jnp.asarray([5.0, 0.0, 0.0])  # depth 1
  assert space.skipped(arch) == ["inner/1", "inner/2"]
  derived, small = space.derived_network(arch)  # its FLOPs are checked against predict
  x = jnp.asarray(np.random.default_rng().normal(size=(2, 6, 6, 3)), jnp.float32)
  assert derived.apply(small, x, train=False).shape == (2, 3)
  assert set(small["params"]["inner"]) == {"stem", "0", "head"}


# --- models written for pmap: a collective over the batch's axis name ----------------

PMAP_MODEL = '''
import flax.linen as nn


class PmapNet(nn.Module):
  """Flax ImageNet example style: BatchNorm(axis_name='batch'), written for pmap."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                     axis_name="batch", name=name)
    h = nn.relu(norm("bn1")(nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)))
    h = nn.relu(norm("bn2")(nn.Conv(8, (3, 3), use_bias=False, name="conv2")(h)))
    return nn.Dense(self.num_classes, name="head")(h.mean((1, 2)))


def make(num_classes):
  return PmapNet(num_classes)
'''


class AxisBN(nn.Module):
  axis_name: str | None = "batch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(4, (3, 3), name="conv")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.5, axis_name=self.axis_name,
                     name="bn")(h)
    return nn.Dense(3, name="head")(nn.relu(h).mean((1, 2)))


def test_pmap_model_gets_its_axis_bound_to_the_global_batch(tmp_path, monkeypatch):
  """external.build binds a pmap model's axis name: a train step's logits and batch
  statistics are those of plain BatchNorm over the whole batch."""
  from jaxprune.models import external  # pylint: disable=g-import-not-at-top
  (tmp_path / "pmap_models_t.py").write_text(PMAP_MODEL.replace("PmapNet", "Net"))
  monkeypatch.syspath_prepend(str(tmp_path))
  built = external.build("pmap_models_t:make", None, 10, (6, 6, 3))
  assert isinstance(built, adapters.BindAxis) and built.axis_name == "batch"

  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 2)), jnp.float32)
  bound = adapters.BindAxis(AxisBN("batch"), "batch")
  variables = _randomize(bound.init(jax.random.key(0), x, train=False),
                         int(rng.integers(1 << 30)))
  variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
  got, got_stats = jax.jit(lambda v, x: bound.apply(v, x, train=True,
                                                    mutable=["batch_stats"]))(variables, x)
  want, want_stats = AxisBN(None).apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_stats, want_stats)
  np.testing.assert_allclose(bound.apply(variables, x, train=False),
                             AxisBN(None).apply(variables, x, train=False), rtol=1e-6)


@pytest.mark.e2e
def test_cli_prune_recipe_on_a_pmap_model(tmp_path):
  """--config.model.name with a model written for pmap trains, prunes and fine-tunes
  (was: 'unbound axis name: batch' in the first step, after the workdir was written)."""
  import cli  # pylint: disable=g-import-not-at-top
  report = cli.prune_smoke_on_user_code(tmp_path, "pmap_models_cli", PMAP_MODEL)
  assert 0 < report["pruned_flops"] <= 0.5 * report["dense_flops"]


class NNXTagger(nnx.Module):
  """An NNX text model taking token ids and a mask."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.fc1 = nnx.Linear(D, F, rngs=rngs)
    self.fc2 = nnx.Linear(F, D, rngs=rngs)
    self.head = nnx.Linear(D, C, rngs=rngs)

  def __call__(self, ids, mask):
    h = self.embed(ids) * mask[..., None]
    h = h + self.fc2(nnx.relu(self.fc1(h)))
    return self.head(h.sum(1))


@pytest.mark.slow
def test_search_space_through_call_on_several_inputs():
  """SearchSpace takes call= and a pytree input_shape (Linen and NNX): full-width picks
  give the model's own logits, a search step's gradients reach the width logits, the
  derived network runs (its FLOPs are checked against the prediction)."""
  from jaxprune.models.tas_resnet import Selection  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng()
  x = _encoder_inputs(rng, 3)
  shapes = {"ids": jax.ShapeDtypeStruct((L,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((L,), jnp.bool_),
            "pos": jax.ShapeDtypeStruct((L,), jnp.int32)}
  model = Encoder()
  variables = _randomize(model.init(jax.random.key(0), x["ids"], x["mask"], x["pos"]),
                         int(rng.integers(1 << 30)))
  call = lambda v, x: model.apply(v, x["ids"], x["mask"], x["pos"])
  tagger = NNXTagger(nnx.Rngs(int(rng.integers(1 << 30))))
  cases = [(search.SearchSpace(model, variables, shapes, call, ignore=["attn/"]),
            call(variables, x)),
           (search.SearchSpace(tagger, None, shapes, lambda m, x: m(x["ids"], x["mask"])),
            tagger(x["ids"], x["mask"]))]
  for space, own in cases:
    assert "fc1" in space.names
    full = [Selection(jnp.asarray([len(c) - 1, 0]), jnp.asarray([1.0, 0.0]),
                      jnp.asarray([c[-1], c[0]], jnp.int32)) for c in space.candidates]
    np.testing.assert_allclose(space.apply(space.variables, x, train=False, selections=full),
                               own, rtol=1e-5, atol=1e-5)
    arch = space.init_arch(jax.random.key(1))

    def loss(a, space=space):
      logits, _ = space.apply(space.variables, x, a, train=True, tau=5.0,
                              key=jax.random.key(2))
      return jnp.mean(logits ** 2)
    grads = jax.grad(loss)(arch)["width_logits"]
    assert all(np.any(np.asarray(g) != 0) for g in grads.values())
    derived, small = space.derived_network(arch)
    assert derived.apply(small, x, train=False).shape == (3, C)


class StdConv(nn.Conv):
  """big_vision BiT's weight-standardised conv (NHWC): the kernel is normalised over
  its taps and input channels before the convolution."""

  def param(self, name, *args, **kwargs):
    p = super().param(name, *args, **kwargs)
    if name == "kernel":
      p = (p - p.mean((0, 1, 2), keepdims=True)) / jnp.sqrt(
          p.var((0, 1, 2), keepdims=True) + 1e-10)
    return p


class TinyBiT(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = StdConv(8, (3, 3), name="conv1")(x)
    h = nn.relu(nn.GroupNorm(num_groups=None, group_size=1, name="gn1")(h))
    h = StdConv(8, (3, 3), name="conv2")(h)
    return nn.Dense(3, name="head")(nn.relu(h).mean((1, 2)))


@pytest.mark.slow
def test_search_space_mixes_weight_standardised_nhwc_convs():
  """A conv whose kernel is computed from its parameter (weight standardisation) is a
  searched producer (was excluded as 'does not put the group's channels on its
  output's last axis'); full-width picks give the model's own logits."""
  from jaxprune.models.tas_resnet import Selection  # pylint: disable=g-import-not-at-top
  model = TinyBiT()
  rng = np.random.default_rng()
  variables = _randomize(model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3))),
                         int(rng.integers(1 << 30)))
  space = search.SearchSpace(model, variables, (6, 6, 3))
  assert space.names == ["conv1", "conv2"] and space.excluded == {}
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  full = [Selection(jnp.asarray([len(c) - 1, 0]), jnp.asarray([1.0, 0.0]),
                    jnp.asarray([c[-1], c[0]], jnp.int32)) for c in space.candidates]
  np.testing.assert_allclose(space.apply(variables, x, train=False, selections=full),
                             model.apply(variables, x), rtol=1e-5, atol=1e-5)
  derived, small = space.derived_network(space.init_arch(jax.random.key(1)))
  assert derived.apply(small, x, train=False).shape == (2, 3)


def test_search_space_on_a_pmap_model_mixes_with_global_batch_statistics():
  """The TAS search's train-mode forward of a BindAxis model (BatchNorm over the 'batch'
  axis, run per example under vmap) equals the same model with a plain BatchNorm, for
  the same sampled widths: logits and updated statistics."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 2)), jnp.float32)
  bound, plain = adapters.BindAxis(AxisBN("batch"), "batch"), AxisBN(None)
  variables = _randomize(plain.init(jax.random.key(0), x), int(rng.integers(1 << 30)))
  variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
  spaces = [search.SearchSpace(m, variables, (6, 6, 2)) for m in (bound, plain)]
  assert spaces[0].names == spaces[1].names == ["conv"]
  picks = spaces[1].sample(spaces[1].init_arch(jax.random.key(1)), 1.0,
                           jax.random.key(int(rng.integers(1 << 30))))
  (yb, sb), (yp, sp) = [s.apply(variables, x, train=True, selections=picks) for s in spaces]
  np.testing.assert_allclose(yb, yp, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sb, sp)


class _TakesTrain(nn.Module):
  """A first layer that takes ``train`` (a Sequential passes it there)."""
  width: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), name="conv")(x)
    return nn.BatchNorm(use_running_average=not train, name="bn")(x)


@pytest.mark.parametrize("first_takes_train", [False, True])
def test_sequential_models_trace_prune_and_equal_the_masked_original(first_takes_train):
  """An ``nn.Sequential`` forwards keywords to its first layer: ``train`` is passed only
  when that layer takes it (a plain ``nn.Conv`` first failed with a TypeError before).
  Fresh random widths, weights and kept channels: the pruned Sequential equals the
  original with the removed channels zeroed."""
  rng = np.random.default_rng()
  c1, c2 = (int(v) for v in rng.integers(3, 9, 2))
  first = _TakesTrain(c1) if first_takes_train else nn.Conv(c1, (3, 3))
  model = nn.Sequential([first, nn.relu, nn.Conv(c2, (3, 3)), nn.relu,
                         lambda x: x.mean(axis=(1, 2)), nn.Dense(3)])
  variables = _randomize(model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2))),
                         int(rng.integers(1 << 30)))
  assert graph.tracing.accepts_train(model) == first_takes_train
  g = graph.trace(model, variables, (6, 6, 2))
  groups = g.prunable()
  assert sorted(grp.width for grp in groups) == sorted([c1, c2])
  keep = {grp.id: np.sort(rng.choice(grp.width, int(rng.integers(1, grp.width)),
                                     replace=False)) for grp in groups}
  small = surgery.prune(model, variables, (6, 6, 2), keep)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 2)), jnp.float32)
  masked = _zeroed(variables, graph.kept_slices(g, keep))
  np.testing.assert_allclose(small.model.apply(small.variables, x), model.apply(masked, x),
                             rtol=1e-5, atol=1e-5)
