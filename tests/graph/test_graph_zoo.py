"""The model zoo through jaxprune.graph, surgery.prune and flops.count (issue 12's evidence).

For every zoo architecture (tests/zoo), in Linen and NNX:
- the groups we expect exist (residual streams coupled by adds, depthwise in/out,
  concatenation offsets, flatten copies, attention heads, ...), and every width of
  the architecture is exactly one prunable group;
- a random 30-60% of every prunable group removed: the smaller network runs with the
  same output shape; its params equal the graph's prediction (the kept slices' sizes)
  and the hand count of its widths, and flops.count of it equals the hand count; one
  group removed alone changes FLOPs and params by exactly removed * per-channel;
- the pruned network is the zoo's own code at the smaller widths (same outputs);
- removed channels that were exactly zero (masked) give the masked original's outputs;
- prune -> one train step -> orbax save -> restore into the smaller architecture;
- the Linen and NNX twins have the same groups and counts.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import sweep
from jaxprune import flops, graph, surgery
from zoo import BY_NAME, ZOO, example, init_linen, init_nnx, masked_exact, nnx_params

NAMES = [a.name for a in ZOO]
# The day-to-day tier's cases of the sweeps below (conftest.sweep): a plain stack,
# concatenation, depthwise convs, jaxprune's own layers, an MLP (residual streams:
# tests/surgery/test_surgery.py's resnet8).
QUICK = {"plain_cnn", "split_concat", "mobilenet_v1", "jaxprune_conv", "mlp"}
APIS = ["linen", "nnx"]
TOL = dict(rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------ helpers

def _key(keypath):
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def flat(tree):
  return {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflat(tree, values):
  return jax.tree_util.tree_map_with_path(lambda p, v: values.get(_key(p), v), tree)


def strip(path: str) -> str:
  """A member path without the Linen collection prefix (NNX paths have none)."""
  head, _, rest = path.partition("/")
  return rest if head in ("params", "batch_stats") else path


def signature(group):
  return frozenset((strip(m.path), m.axis) for m in group.members)


class Setup:
  """One zoo model in one API: model, variables (None for NNX), its state tree and graph."""

  def __init__(self, arch, api, seed=0):
    self.arch, self.api = arch, api
    if api == "linen":
      self.model, self.variables = init_linen(arch, seed=seed)
      self.tree = self.variables
      self.graph = graph.trace(self.model, self.variables, arch.input_shape)
    else:
      self.model, self.variables = init_nnx(arch, seed=seed), None
      self.tree = nnx.to_pure_dict(nnx.state(self.model))
      self.graph = graph.trace(self.model, None, arch.input_shape)

  def params(self):
    return self.variables["params"] if self.api == "linen" else nnx_params(self.model)

  def is_param(self, path):
    return path.startswith("params/") if self.api == "linen" else (
        path in flat(nnx_params(self.model)))

  def with_tree(self, tree):
    """(model, variables) holding `tree` instead of the setup's values."""
    if self.api == "linen":
      return self.model, tree
    model = nnx.clone(self.model)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)
    return model, None

  def prune(self, keep, tree=None):
    model, variables = self.with_tree(tree) if tree is not None else (self.model,
                                                                     self.variables)
    return surgery.prune(model, variables, self.arch.input_shape, keep)


def run(model, variables, x):
  """The eval-mode forward, compiled once (eager Linen/NNX dispatches op by op)."""
  if variables is not None:
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  model.eval()
  return nnx.jit(lambda m, x: m(x))(model, x)


def pruned_params(pruned):
  return pruned.variables["params"] if pruned.variables is not None else nnx_params(pruned.model)


def count(model, variables, arch):
  return flops.count(model, variables, arch.input_shape)


def random_keep(groups, rng, low=0.3, high=0.6):
  """{group id: kept indices} with a random low..high fraction of each group removed."""
  keep = {}
  for g in groups:
    removed = int(rng.integers(math.ceil(low * g.width), max(math.ceil(low * g.width),
                                                             int(high * g.width)) + 1))
    removed = min(removed, g.width - 1)
    keep[g.id] = np.sort(rng.choice(g.width, g.width - removed, replace=False))
  return keep


def shapes_after(tree, slices):
  """Shape structs of `tree` with the kept slices' sizes (no surgery)."""
  def shrink(path, leaf):
    shape = list(np.shape(leaf))
    for axis, kept in slices.get(path, {}).items():
      shape[axis] = len(kept)
    return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(leaf))
  return jax.tree_util.tree_map_with_path(lambda p, v: shrink(_key(p), v), tree)


def _nnx_param_subtree(setup, tree):
  wanted = set(flat(nnx_params(setup.model)))
  def keep_params(node, prefix=""):
    if isinstance(node, dict):
      out = {}
      for k, v in node.items():
        sub = keep_params(v, f"{prefix}{k}/")
        if sub is not None:
          out[k] = sub
      return out or None
    return node if prefix[:-1] in wanted else None
  return keep_params(tree)


def entries(tree):
  return int(sum(math.prod(np.shape(v)) for v in jax.tree.leaves(tree)))


def masked(setup, keep):
  """The setup's tree with the removed channels exactly zero: every params member that
  is not a consumer (the producers' kernel slices, their biases, BN / LN scale and bias)."""
  values = flat(setup.tree)
  for g in setup.graph.prunable():
    if g.id not in keep:
      continue
    removed = np.setdiff1d(np.arange(g.width), keep[g.id])
    for m in g.members:
      if m.role == "consumer" or not setup.is_param(m.path):
        continue
      idx = np.asarray(m.index)[removed].ravel()
      leaf = np.array(values[m.path])
      sl = [slice(None)] * leaf.ndim
      sl[m.axis] = idx
      leaf[tuple(sl)] = 0
      values[m.path] = jnp.asarray(leaf)
  return unflat(setup.tree, values)


def find(g, path, axis):
  """The group with member (path without collection prefix, axis)."""
  hits = [grp for grp in g.groups if (path, axis) in signature(grp)]
  assert len(hits) == 1, (path, axis, [sorted(signature(h)) for h in hits], str(g))
  return hits[0]


def member(group, path, axis):
  (m,) = [m for m in group.members if strip(m.path) == path and m.axis == axis]
  return m


def _index(group, path, axis):
  return np.asarray(member(group, path, axis).index)


# ------------------------------------------------------------- expected groups

def _expect_resnet_basic(g, w):
  stream = find(g, "conv_init/kernel", 3)
  for p, ax in (("s1b0/conv2/kernel", 3), ("s1b1/conv2/kernel", 3), ("s1b0/conv1/kernel", 2),
                ("s1b1/conv1/kernel", 2), ("s2b0/conv1/kernel", 2), ("s2b0/conv_proj/kernel", 2),
                ("s1b0/bn2/scale", 0), ("bn_init/scale", 0)):
    assert (p, ax) in signature(stream), p
  assert stream.width == w["stem"] and stream.prunable
  stage2 = find(g, "s2b0/conv2/kernel", 3)
  for p, ax in (("s2b0/conv_proj/kernel", 3), ("s2b0/norm_proj/scale", 0),
                ("s2b1/conv2/kernel", 3), ("head/kernel", 0)):
    assert (p, ax) in signature(stage2), p
  mid = find(g, "s1b0/conv1/kernel", 3)
  assert ("s1b0/conv2/kernel", 2) in signature(mid) and mid.width == w["s1b0"]


def _expect_resnet_bottleneck(g, w):
  stem = find(g, "conv_init/kernel", 3)
  assert {("s1b0/conv1/kernel", 2), ("s1b0/conv_proj/kernel", 2)} <= signature(stem)
  out1 = find(g, "s1b0/conv3/kernel", 3)
  assert {("s1b0/conv_proj/kernel", 3), ("s1b1/conv3/kernel", 3), ("s1b1/conv1/kernel", 2),
          ("s2b0/conv_proj/kernel", 2), ("s1b0/bn3/scale", 0)} <= signature(out1)
  assert out1.width == w["s1_out"] and out1.id != stem.id
  b = find(g, "s2b0/conv2/kernel", 3)
  assert ("s2b0/conv3/kernel", 2) in signature(b) and b.width == w["s2b0_b"]


def _expect_mobilenet_v1(g, w):
  c0 = find(g, "conv_stem/kernel", 3)
  # The depthwise conv couples its input and output channels.
  assert {("dw1/kernel", 3), ("dw1_bn/scale", 0), ("pw1/kernel", 2)} <= signature(c0)
  c1 = find(g, "pw1/kernel", 3)
  assert {("dw2/kernel", 3), ("pw2/kernel", 2)} <= signature(c1) and c1.width == w["c1"]


def _expect_mobilenet_v2(g, w):
  c0 = find(g, "conv_stem/kernel", 3)
  assert {("b1/project/kernel", 3), ("b1/expand/kernel", 2), ("b2/expand/kernel", 2),
          ("b1/project_bn/scale", 0)} <= signature(c0)
  c2 = find(g, "b2/project/kernel", 3)
  assert {("b3/project/kernel", 3), ("conv_head/kernel", 2)} <= signature(c2)
  e1 = find(g, "b1/expand/kernel", 3)
  assert {("b1/dw/kernel", 3), ("b1/project/kernel", 2)} <= signature(e1)


def _expect_densenet(g, w):
  c0, g1, g2 = w["c0"], w["g1"], w["g2"]
  stem = find(g, "conv_stem/kernel", 3)
  g1_group = find(g, "layer1_conv/kernel", 3)
  g2_group = find(g, "layer2_conv/kernel", 3)
  for grp, offset, width in ((stem, 0, c0), (g1_group, c0, g1), (g2_group, c0 + g1, g2)):
    assert grp.width == width
    for later in ("layer3_conv/kernel", "trans_conv/kernel"):
      np.testing.assert_array_equal(_index(grp, later, 2).ravel(), offset + np.arange(width))
    np.testing.assert_array_equal(_index(grp, "trans_bn/scale", 0).ravel(),
                                  offset + np.arange(width))
  np.testing.assert_array_equal(_index(g1_group, "layer2_conv/kernel", 2).ravel(),
                                c0 + np.arange(g1))


def _expect_split_concat(g, w):
  left, right = w["left"], w["right"]
  # The split cuts at an offset fixed in the code (self.left): the stem's channels are one
  # group that stays whole, with the reason (a pruned network would split at the old place).
  groups = [grp for grp in g.groups if ("conv_stem/kernel", 3) in signature(grp)]
  assert [grp.width for grp in groups] == [left + right]
  assert not groups[0].prunable and "split" in groups[0].reason
  r2 = find(g, "pw2/kernel", 3)
  np.testing.assert_array_equal(_index(r2, "fuse/kernel", 2).ravel(), left + np.arange(w["r2"]))


def _expect_unet(g, w):
  u2 = find(g, "up2/kernel", 3)  # ConvTranspose kernel (k, k, in, out)
  assert ("up2/bias", 0) in signature(u2)
  np.testing.assert_array_equal(_index(u2, "dec2/kernel", 2).ravel(), np.arange(w["u2"]))
  e2 = find(g, "enc2/kernel", 3)
  assert ("mid/kernel", 2) in signature(e2)
  np.testing.assert_array_equal(_index(e2, "dec2/kernel", 2).ravel(), w["u2"] + np.arange(w["e2"]))
  m = find(g, "mid/kernel", 3)
  assert ("up2/kernel", 2) in signature(m)


def _expect_vgg(g, w):
  c4 = find(g, "conv4/kernel", 3)
  index = _index(c4, "fc1/kernel", 0)  # flatten: channel c -> rows p * c4 + c
  assert index.shape == (w["c4"], 16)
  for c in range(w["c4"]):
    np.testing.assert_array_equal(np.sort(index[c]), c + w["c4"] * np.arange(16))
  hidden = find(g, "fc1/kernel", 1)
  assert ("fc2/kernel", 0) in signature(hidden) and hidden.width == w["hidden"]


def _expect_vit(g, w):
  heads = find(g, "attn/query/kernel", 1)
  assert {("attn/key/kernel", 1), ("attn/value/kernel", 1), ("attn/out/kernel", 0),
          ("attn/query/bias", 0)} <= signature(heads)
  assert heads.width == w["heads"] and heads.prunable
  # Flax attention has one qkv_features: the value head dim is the query/key head dim.
  qk = find(g, "attn/query/kernel", 2)
  assert {("attn/key/kernel", 2), ("attn/value/kernel", 2),
          ("attn/out/kernel", 1)} <= signature(qk)
  hidden = find(g, "mlp1/kernel", 1)
  assert ("mlp2/kernel", 0) in signature(hidden) and hidden.width == w["mlp"] and hidden.prunable
  embed = find(g, "patch/kernel", 3)
  assert {("cls", 2), ("pos", 2), ("ln1/scale", 0), ("attn/query/kernel", 0),
          ("attn/out/kernel", 2), ("mlp2/kernel", 1), ("head/kernel", 0)} <= signature(embed)


def _expect_remat_cnn(g, w):
  c0 = find(g, "conv_stem/kernel", 3)
  assert {("block1/conv2/kernel", 3), ("block2/conv2/kernel", 3), ("block2/conv1/kernel", 2),
          ("head/kernel", 0)} <= signature(c0)
  m1 = find(g, "block1/conv1/kernel", 3)  # inside the checkpoint (remat) jaxpr
  assert ("block1/conv2/kernel", 2) in signature(m1) and m1.prunable


def _expect_jaxprune_conv(g, w):
  c1 = find(g, "conv1/kernel", 3)  # through layers.conv2d's custom_vjp
  assert {("bn1/scale", 0), ("bn1/mean", 0), ("conv2/kernel", 2)} <= signature(c1)
  c2 = find(g, "conv2/kernel", 3)
  assert ("conv2/bias", 0) in signature(c2) and _index(c2, "head/kernel", 0).shape == (w["c2"], 16)


def _expect_plain_cnn(g, w):
  c1 = find(g, "conv1/kernel", 3)
  assert {("conv1/bias", 0), ("conv2/kernel", 2)} <= signature(c1) and c1.width == w["c1"]


def _expect_mlp(g, w):
  h1 = find(g, "fc1/kernel", 1)
  assert ("fc1/bias", 0) in signature(h1) and ("fc2/kernel", 0) in signature(h1)


EXPECT = {name: globals()["_expect_" + name] for name in NAMES}


# -------------------------------------------------------------------- tests

@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", NAMES)
def test_zoo_groups_are_the_expected_ones(name, api):
  arch = BY_NAME[name]
  s = Setup(arch, api)
  g = s.graph
  EXPECT[name](g, arch.widths)
  # Every width of the architecture is one prunable group (but the split stem, which stays
  # whole); the classes and the input channels are not prunable.
  widths = dict(arch.widths)
  if name == "split_concat":
    widths.pop("left"), widths.pop("right")
  if name == "vit":  # one qkv_features: v_dim is qk_dim's group
    widths.pop("v_dim")
  assert sorted(grp.width for grp in g.prunable()) == sorted(widths.values()), str(g)
  for grp in g.prunable():
    assert grp.producers, str(g)
    assert grp.flops_per_channel > 0 and grp.params_per_channel > 0
  out_path = {"unet": "out/kernel", "mlp": "fc3/kernel", "vgg": "fc2/kernel"}.get(name,
                                                                               "head/kernel")
  outs = [grp for grp in g.groups if (out_path, (3 if name == "unet" else 1)) in signature(grp)]
  assert outs and not any(grp.prunable for grp in outs)
  assert str(g)  # a readable printout


@pytest.mark.parametrize("name", sweep(NAMES, QUICK))
def test_zoo_linen_and_nnx_twins_give_the_same_groups_and_counts(name):
  arch = BY_NAME[name]
  lin, nx = Setup(arch, "linen"), Setup(arch, "nnx")
  describe = lambda g: sorted((sorted(signature(grp)), grp.width, grp.prunable,
                               grp.flops_per_channel, grp.params_per_channel)
                              for grp in g.groups)
  assert describe(lin.graph) == describe(nx.graph)
  hand = arch.count(arch.widths)
  assert count(lin.model, lin.variables, arch) == hand
  assert count(nx.model, None, arch) == hand
  # The same removal (matched by members) gives the same smaller network in both APIs.
  by_sig = {signature(grp): grp for grp in nx.graph.prunable()}
  keep_lin = random_keep(lin.graph.prunable(), np.random.default_rng(1))
  keep_nx = {by_sig[signature(grp)].id: keep_lin[grp.id] for grp in lin.graph.prunable()}
  p_lin, p_nx = lin.prune(keep_lin), nx.prune(keep_nx)
  assert count(p_lin.model, p_lin.variables, arch) == count(p_nx.model, None, arch)
  x = example(arch)
  np.testing.assert_allclose(run(p_nx.model, None, x), run(p_lin.model, p_lin.variables, x),
                             **TOL)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", sweep(NAMES, QUICK))
def test_zoo_graph_predicts_counts_exactly(name, api):
  """Without surgery: the kept slices' sizes give the hand count's params at the widths
  they imply, and one group removed alone changes FLOPs and params by exactly
  removed * flops_per_channel / params_per_channel."""
  arch = BY_NAME[name]
  s = Setup(arch, api)
  full = arch.count(arch.widths)
  rng = np.random.default_rng(2)
  keep = random_keep(s.graph.prunable(), rng)
  shapes = shapes_after(s.tree, graph.kept_slices(s.graph, keep))
  pshapes = shapes["params"] if api == "linen" else _nnx_param_subtree(s, shapes)
  assert entries(pshapes) == arch.count(arch.widths_of(pshapes))["params"]
  for grp in s.graph.prunable():
    alone = random_keep([grp], rng)
    removed = grp.width - len(alone[grp.id])
    shapes = shapes_after(s.tree, graph.kept_slices(s.graph, alone))
    pshapes = shapes["params"] if api == "linen" else _nnx_param_subtree(s, shapes)
    hand = arch.count(arch.widths_of(pshapes))
    assert full["params"] - hand["params"] == removed * grp.params_per_channel, str(grp)
    assert full["flops"] - hand["flops"] == pytest.approx(removed * grp.flops_per_channel,
                                                          rel=1e-9), str(grp)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", sweep(NAMES, QUICK))
def test_zoo_random_prune_runs_and_matches_the_hand_count(name, api, tmp_path):
  arch = BY_NAME[name]
  s = Setup(arch, api)
  keep = random_keep(s.graph.prunable(), np.random.default_rng(3))
  slices = graph.kept_slices(s.graph, keep)
  p = s.prune(keep)
  x = example(arch)
  y = run(p.model, p.variables, x)
  assert y.shape == (2,) + arch.output_shape
  assert bool(jnp.all(jnp.isfinite(y)))
  widths = arch.widths_of(pruned_params(p))
  fixed = {"left", "right"} if arch.name == "split_concat" else set()  # the split stays whole
  assert all(widths[k] < arch.widths[k] for k in widths if k not in fixed), widths
  assert all(widths[k] == arch.widths[k] for k in fixed), widths
  hand = arch.count(widths)
  got = count(p.model, p.variables, arch)
  assert got == hand
  assert entries(pruned_params(p)) == entries(
      (lambda t: t["params"] if api == "linen" else _nnx_param_subtree(s, t))(
          shapes_after(s.tree, slices)))
  # The pruned network is the zoo's own code at the smaller widths.
  if arch.buildable(widths):
    if api == "linen":
      same_code = arch.build_linen(widths)
      np.testing.assert_allclose(same_code.apply(p.variables, x, train=False), y, **TOL)
    else:
      same_code = nnx.eval_shape(lambda: arch.build_nnx(widths))
      nnx.update(same_code, nnx.state(p.model))
      same_code.eval()
      np.testing.assert_allclose(same_code(x), y, **TOL)
  _train_save_restore(arch, api, p, x, tmp_path)


def _train_save_restore(arch, api, p, x, tmp_path):
  """One SGD step on the smaller network, orbax save, restore into its architecture."""
  labels = jnp.zeros(x.shape[:1] + arch.output_shape[:-1], jnp.int32)

  def loss_of(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  if api == "linen":
    model, variables = p.model, p.variables

    def loss(params, rest):
      logits, updates = model.apply({"params": params, **rest}, x, train=True,
                                    mutable=["batch_stats"])
      return loss_of(logits), updates

    rest = {k: v for k, v in variables.items() if k != "params"}
    # Compiled once: an eager Linen train step dispatches (and compiles) op by op.
    (before, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"], rest)
    tx = optax.sgd(0.1)
    upd, _ = tx.update(grads, tx.init(variables["params"]))
    trained = {**variables, **updates, "params": optax.apply_updates(variables["params"], upd)}
    after = jax.jit(loss)(trained["params"],
                          {k: v for k, v in trained.items() if k != "params"})[0]
    assert float(after) != float(before)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", trained)
    ckpt.wait_until_finished()
    # The restore target comes from the smaller architecture, not the original model.
    target = jax.eval_shape(lambda: arch.build_linen(arch.widths_of(trained["params"])).init(
        jax.random.key(0), jnp.zeros((1,) + arch.input_shape), train=False)) \
        if arch.buildable(arch.widths_of(trained["params"])) else jax.eval_shape(lambda: trained)
    restored = ckpt.restore(tmp_path / "ckpt", target)
    jax.tree.map(np.testing.assert_array_equal, dict(restored), trained)
    forward = jax.jit(lambda v: model.apply(v, x, train=False))
    np.testing.assert_array_equal(forward(restored), forward(trained))
  else:
    model = p.model
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    before, grads = nnx.jit(nnx.value_and_grad(lambda m: loss_of(m(x))))(model)
    optimizer.update(model, grads)
    after = nnx.jit(lambda m: loss_of(m(x)))(model)
    assert float(after) != float(before)
    model.eval()
    graphdef, state = nnx.split(model)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", nnx.to_pure_dict(state))
    ckpt.wait_until_finished()
    widths = arch.widths_of(nnx_params(model))
    fresh = nnx.eval_shape(lambda: arch.build_nnx(widths)) if arch.buildable(widths) else \
        nnx.eval_shape(lambda: nnx.merge(graphdef, state))
    target = nnx.to_pure_dict(nnx.state(fresh))
    restored = ckpt.restore(tmp_path / "ckpt", target)
    fresh_state = nnx.state(fresh)
    nnx.replace_by_pure_dict(fresh_state, restored)
    nnx.update(fresh, fresh_state)
    fresh.eval()
    np.testing.assert_array_equal(fresh(x), model(x))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", sweep(NAMES, QUICK))
def test_zoo_removing_masked_channels_keeps_the_outputs(name, api):
  """Zero the removed channels (producer slices, biases, BN scale and bias), then remove
  them: the logits equal the masked original's to float32 rounding. Groups through
  LayerNorm statistics (ViT's embedding) or the attention temperature 1/sqrt(qk_dim)
  are not removed exactly by a mask, and stay whole here (zoo.Arch.inexact)."""
  arch = BY_NAME[name]
  s = Setup(arch, api)
  exact = [grp for grp in s.graph.prunable()
           if masked_exact(arch, [(strip(m.path), m.axis) for m in grp.members])]
  if name == "vit":
    assert len(exact) == len(s.graph.prunable()) - 2  # embed (LayerNorm), qk_dim
  else:
    assert len(exact) == len(s.graph.prunable())
  keep = random_keep(exact, np.random.default_rng(4))
  tree = masked(s, keep)
  x = example(arch, seed=5)
  model, variables = s.with_tree(tree)
  want = run(model, variables, x)
  p = s.prune(keep, tree)
  got = run(p.model, p.variables, x)
  np.testing.assert_allclose(got, want, **TOL)
  # And the mask mattered: the unmasked original differs.
  assert not np.allclose(run(s.model, s.variables, x), want, **TOL)
