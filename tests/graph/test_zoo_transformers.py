"""Real-model patterns (tests/zoo_models.py) through graph, flops and surgery (issue 22).

For each model of the zoo, written with Flax only in the patterns of published code:
- FLOPs and params by ``flops.count`` equal the hand count (dead code excluded) and the
  params equal the leaf count;
- about half of every prunable group removed: the smaller network runs, trains one step,
  and has the FLOPs and params ``Graph.predict`` gave;
- every group claimed exact (or compensated) gives the masked original's logits to
  float32 rounding when its removed channels are zeroed and then removed; every group
  claimed approximate says why.
Token-id models run through the one-input API (ids read from x, see ``ZooModel.single``).
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn
from flax import nnx

from conftest import sweep
from jaxprune import flops, graph, surgery
from jaxprune.errors import UserError
import zoo_models as Z

TOL = dict(rtol=2e-5, atol=2e-5)
NAMES = [m.name for m in Z.ZOO]
# The day-to-day tier's cases of the heavier sweeps (conftest.sweep): a decoder (GPT),
# a text model with a constant-sized table (LM1B), a pmap-era, a branching and a
# weight-standardised ResNet, and a model with a dead output.
QUICK = {"gpt", "lm1b", "pmap_resnet", "branch_resnet", "stdconv", "dead_output"}
_CACHE = {}


class Setup:
  """One zoo model, built once per test session, with its graph on the one-input API."""

  def __init__(self, name):
    self.spec = Z.BY_NAME[name]
    self.model, self.variables = self.spec.build(0)
    self.input_shape, self.call = self.spec.single(self.model)
    self.graph = graph.trace(self.model, self.variables, self.input_shape, call=self.call)


def setup(name):
  if name not in _CACHE:
    _CACHE[name] = Setup(name)
  return _CACHE[name]


def forward(spec, model, variables, inputs, train=False):
  """(logits, updated collections) of the model's own forward on a concrete batch."""
  if variables is None:
    model.train() if train else model.eval()
    return spec.pick(model(*spec.args(inputs))), {}
  kwargs = {"train": train} if "train" in inspect.signature(model.__call__).parameters else {}
  mutable = ["batch_stats"] if train and "batch_stats" in variables else False
  out = model.apply(variables, *spec.args(inputs), mutable=mutable, **kwargs)
  return (spec.pick(out[0]), out[1]) if mutable else (spec.pick(out), {})


def logits(spec, model, variables, inputs):
  if variables is None:
    return nnx.jit(lambda m, i: forward(spec, m, None, i)[0])(model, inputs)
  return jax.jit(lambda v, i: forward(spec, model, v, i)[0])(variables, inputs)


def labels_for(spec, inputs, rng):
  if len(spec.output_shape) == 2:  # a language model: next tokens
    return inputs["input_ids"]
  return jnp.asarray(rng.integers(0, spec.output_shape[-1], size=(2,)), jnp.int32)


def train_step_lowers_the_loss(spec, model, variables, inputs, labels):
  """One SGD step (lr 1e-3) on the batch lowers its training loss (first order: the
  decrease is lr * |grad|^2 >> float32 rounding)."""
  def loss_of(y):
    return optax.softmax_cross_entropy_with_integer_labels(y, labels).mean()

  if variables is None:
    model.train()
    opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
    # One compiled function for both losses (a compile costs more than the step).
    value_and_grad = nnx.jit(nnx.value_and_grad(
        lambda m: loss_of(forward(spec, m, None, inputs, True)[0])))
    before, grads = value_and_grad(model)
    opt.update(model, grads)
    after, _ = value_and_grad(model)
    model.eval()
  else:
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
      return loss_of(forward(spec, model, {"params": params, **rest}, inputs, True)[0])
    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one compile for both losses
    before, grads = value_and_grad(variables["params"])
    sgd = jax.jit(lambda p, g: jax.tree.map(lambda p, g: p - 1e-3 * g, p, g))  # not leaf by leaf
    after, _ = value_and_grad(sgd(variables["params"], grads))
  assert bool(jnp.isfinite(before)) and float(after) < float(before), (before, after)


def half_of(groups, rng):
  return {g.id: np.sort(rng.choice(g.width, max(1, g.width // 2), replace=False))
          for g in groups}


def own_widths(groups, rng):
  """Random kept channels, each group left with a number of entries (kept channels x the
  entries a channel spans in its producer) that no other group is left with where one is
  free, else at a kept width no group of its width has: two groups left equally wide can
  hide a layer that sizes itself from the other group, or change a model's structure where
  it compares widths (BiT adds a unit's projection only when its input and output widths
  differ: root kept at 2 of 4 GroupNorm groups, 8 channels, and unit0's output at 1 of 4,
  8 channels, removed it, 1 in 6 draws before)."""
  keep, used, entries = {}, {}, set()
  for g in groups:
    producers = [m for m in g.members if m.role == "producer"] or list(g.members)
    span = producers[0].index.shape[1]
    taken = used.setdefault(g.width, set())
    free = ([n for n in range(1, g.width) if n * span not in entries]
            or [n for n in range(1, g.width) if n not in taken] or list(range(1, g.width)))
    n = int(rng.choice(free)) if free else g.width
    taken.add(n)
    entries.add(n * span)
    keep[g.id] = np.sort(rng.choice(g.width, n, replace=False))
  return keep


def masked_tree(s, keep):
  """The model's variables with every parameter slice of the removed channels zero."""
  values = dict(graph.named_leaves(s.model, s.variables))
  for gid, kept in keep.items():
    g = s.graph.groups[gid]
    removed = np.setdiff1d(np.arange(g.width), kept)
    for m in g.members:
      if not s.graph.traced.is_param[s.graph.traced.paths.index(m.path)]:
        continue
      leaf = np.array(values[m.path])
      index = [slice(None)] * leaf.ndim
      index[m.axis] = np.asarray(m.index)[removed].ravel()
      leaf[tuple(index)] = 0
      values[m.path] = jnp.asarray(leaf)
  return values


def with_values(s, values):
  """(model, variables) of the setup holding `values` ({leaf path: array})."""
  if s.variables is None:
    model = nnx.clone(s.model)
    state = nnx.state(model)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    new = {graph.tracing.leaf_name(p): v for p, v in flat}
    assert set(values) <= set(new)
    leaves = [values.get(graph.tracing.leaf_name(p), v) for p, v in flat]
    nnx.update(model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), leaves))
    return model, None
  flat, treedef = jax.tree_util.tree_flatten_with_path(s.variables)
  leaves = [values.get(graph.tracing.leaf_name(p), v) for p, v in flat]
  return s.model, jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name", NAMES)
def test_zoo_flops_and_params_equal_the_hand_count(name):
  s = setup(name)
  hand = s.spec.hand_count()
  assert flops.count(s.model, s.variables, s.input_shape, call=s.call) == hand
  assert Z.param_entries(s.model, s.variables) == hand["params"]
  assert s.graph.predict({}) == hand
  assert str(s.graph)  # a readable printout


def overrides_for(s, keep):
  return Z.overrides_for(s.spec.name, s.graph, keep)


@pytest.mark.parametrize("name", sweep(NAMES, QUICK))
def test_zoo_every_group_narrowed_to_its_own_width_runs_trains_and_matches_the_prediction(name):
  s = setup(name)
  rng = np.random.default_rng()
  groups = s.graph.prunable()
  if name == "lm1b":  # the sinusoid table is sized from the config: the residual stays whole
    groups = [g for g in groups if g.kind != "residual"]
  keep = own_widths(groups, rng)
  small = surgery.prune(s.model, s.variables, s.input_shape, keep, call=s.call, graph=s.graph,
                        overrides=overrides_for(s, keep))
  predicted = s.graph.predict(keep)
  shape, call = s.spec.single(small.model)
  assert flops.count(small.model, small.variables, shape, call=call) == predicted
  assert Z.param_entries(small.model, small.variables) == predicted["params"]
  inputs = s.spec.example(2, seed=int(rng.integers(1 << 30)))
  y = logits(s.spec, small.model, small.variables, inputs)
  assert y.shape == (2,) + s.spec.output_shape and bool(jnp.all(jnp.isfinite(y)))
  if name != "pmap_resnet":  # its train mode needs the 'batch' axis: see the test below
    train_step_lowers_the_loss(s.spec, small.model, small.variables, inputs,
                               labels_for(s.spec, inputs, rng))


def test_zoo_lm1b_residual_sized_by_a_constant_is_fixed_or_one_line():
  """The sinusoid table's width comes from the config: the residual stream either stays
  whole with the reason (the constant) or its pruning stops in one line naming the
  module, never a raw TypeError or a wrong network."""
  s = setup("lm1b")
  (res,) = [g for g in s.graph.groups if g.kind == "residual"]
  if not res.prunable:
    assert "constant" in res.reason and "LM1B" in res.reason, res.reason
    return
  keep = {res.id: np.arange(0, res.width, 2)}
  with pytest.raises(UserError) as e:
    surgery.prune(s.model, s.variables, s.input_shape, keep, call=s.call, graph=s.graph)
  message = str(e.value)
  assert "\n" not in message and "LM1B" in message and "32" in message, message


@pytest.mark.parametrize("name", sweep(NAMES, QUICK))
def test_zoo_exact_groups_give_the_masked_originals_logits(name):
  """Zero every parameter slice of the removed channels, then remove them: for groups
  claimed exact or compensated the logits equal the masked original's."""
  s = setup(name)
  rng = np.random.default_rng()
  exact = [g for g in s.graph.prunable() if g.exactness in ("exact", "compensated")]
  for g in s.graph.prunable():
    if g.exactness == "approximate":
      assert g.effects, str(g)  # says which op and where
  if not exact:
    return
  keep = own_widths(exact, rng)
  model, variables = with_values(s, masked_tree(s, keep))
  inputs = s.spec.example(2, seed=int(rng.integers(1 << 30)))
  want = logits(s.spec, model, variables, inputs)
  small = surgery.prune(model, variables, s.input_shape, keep, call=s.call,
                        overrides=overrides_for(s, keep))
  got = logits(s.spec, small.model, small.variables, inputs)
  np.testing.assert_allclose(got, want, **TOL)
  # The mask mattered.
  assert not np.allclose(logits(s.spec, s.model, s.variables, inputs), want, **TOL)


def test_zoo_pmap_batchnorm_trains_with_its_axis_bound_after_pruning():
  """BatchNorm(axis_name='batch') (Flax ImageNet example): pruned, it trains one step with
  the axis bound by shard_map over 2 devices (statistics averaged over both)."""
  s = setup("pmap_resnet")
  rng = np.random.default_rng(3)
  keep = half_of(s.graph.prunable(), rng)
  small = surgery.prune(s.model, s.variables, s.input_shape, keep, graph=s.graph)
  mesh = jax.make_mesh((2,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  x = s.spec.example(2, seed=int(rng.integers(1 << 30)))
  labels = labels_for(s.spec, x, rng)
  P = jax.sharding.PartitionSpec
  rest = {k: v for k, v in small.variables.items() if k != "params"}

  def local_loss(params, x, labels):
    y, _ = small.model.apply({"params": params, **rest}, x, train=True, mutable=["batch_stats"])
    return jax.lax.pmean(optax.softmax_cross_entropy_with_integer_labels(y, labels).mean(),
                         "batch")

  loss = jax.shard_map(local_loss, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                       out_specs=P())
  before, grads = jax.jit(jax.value_and_grad(loss))(small.variables["params"], x, labels)
  new = jax.jit(lambda p, g: jax.tree.map(lambda p, g: p - 1e-3 * g, p, g))(
      small.variables["params"], grads)
  after = jax.jit(loss)(new, x, labels)
  assert float(after) < float(before)


TEXT = [m.name for m in Z.ZOO if isinstance(m.inputs, dict)]


@pytest.mark.parametrize("name", TEXT)
def test_zoo_text_models_take_their_inputs_as_a_pytree_of_shape_structs(name):
  """input_shape = {"input_ids": ShapeDtypeStruct(int32), ...} with the model's own call=:
  the same count and the same groups as through one float input."""
  s = setup(name)
  call = s.spec.call(s.model)
  assert flops.count(s.model, s.variables, s.spec.inputs, call=call) == s.spec.hand_count()
  g = graph.trace(s.model, s.variables, s.spec.inputs, call=call)
  describe = lambda g: sorted((sorted((m.path, m.axis) for m in grp.members), grp.width,
                               grp.prunable, grp.kind, grp.exactness) for grp in g.groups)
  assert describe(g) == describe(s.graph)


def _member_group(g, path, axis):
  hits = [grp for grp in g.groups if any(m.path == path and m.axis == axis for m in grp.members)]
  assert len(hits) <= 1, [str(h) for h in hits]
  return hits[0] if hits else None


@pytest.mark.parametrize("name, tables", [
    ("bert", ["params/word/embedding", "params/position/embedding",
              "params/token_type/embedding"]),
    ("gpt", ["params/wte/embedding", "params/wpe/embedding"]),
    ("llama", ["embed/embedding"]),
])
def test_zoo_embedding_tables_join_the_residual_stream(name, tables):
  """Embedding lookups (gather) are followed: every table's feature axis is in the one
  residual group, which is approximate (LayerNorm / RMSNorm statistics) and says where."""
  s = setup(name)
  (res,) = [g for g in s.graph.groups if g.kind == "residual"]
  for t in tables:
    assert _member_group(s.graph, t, 1) is res, (t, str(s.graph))
  assert res.prunable and res.exactness == "approximate" and res.effects
  if name == "gpt":  # the tied head: the table's vocabulary axis is the logits', fixed
    vocab = _member_group(s.graph, "params/wte/embedding", 0)
    assert vocab is not None and not vocab.prunable


@pytest.mark.parametrize("name, leaves", [
    ("vit_map", [("params/pos_embedding", 1), ("params/cls", 1)]),
    ("vit_scan", [("params/pos_embedding", 1)]),
    ("bert", [("params/position/embedding", 0)]),
    ("gpt", [("params/wpe/embedding", 0)]),
])
def test_zoo_token_and_position_axes_are_never_channel_groups(name, leaves):
  s = setup(name)
  for path, axis in leaves:
    assert _member_group(s.graph, path, axis) is None, (path, axis, str(s.graph))


@pytest.mark.parametrize("name", ["vit_map", "vit_scan", "bert", "gpt", "lm1b", "dead_output"])
def test_zoo_head_dim_under_a_width_scaled_softmax_is_not_claimed_exact(name):
  """Flax attention scales q by 1/sqrt(head_dim), computed from the shape: narrowing the
  head dimension changes it, so the group is approximate, or compensated by surgery."""
  s = setup(name)
  head_dims = [g for g in s.graph.groups if g.kind == "head_dim"]
  assert head_dims, str(s.graph)
  for g in head_dims:
    assert g.exactness in ("approximate", "compensated") and g.effects, str(g)


def test_zoo_grouped_query_heads_are_whole_kv_groups():
  """Llama-style GQA (4 query heads, 2 KV heads of 8): each layer's head group is its 2 KV
  heads, each channel one KV head with its k and v columns, its 2 query heads' q columns
  and their rows of the output projection."""
  s = setup("llama")
  heads = [g for g in s.graph.groups if g.kind == "heads"]
  assert len(heads) == Z.LAYERS and all(g.prunable and g.width == 2 for g in heads)
  for i, g in enumerate(heads):
    by = {m.path.split("/")[-2]: m for m in g.members}
    assert sorted(by) == ["k", "o", "q", "v"]
    for p, cols in (("k", 8), ("v", 8), ("q", 16), ("o", 16)):
      index = np.asarray(by[p].index)
      assert index.shape == (2, cols), (p, index.shape)
      # Channel c is KV head c: a contiguous block (q: its 2 query heads, adjacent).
      np.testing.assert_array_equal(index, np.arange(2 * cols).reshape(2, cols))


def test_zoo_depth_search_finds_blocks_whose_parameters_sit_in_a_branch_submodule():
  from jaxprune import search
  s = setup("branch_resnet")
  space = search.SearchSpace(s.model, s.variables, s.input_shape)
  assert space.depth_names == ["block0..block2"] and space.depth_candidates == [(1, 2, 3)]


def test_zoo_stdconv_input_channels_are_approximate_and_really_change_the_logits():
  """Weight standardisation reads all input channels of a kernel: the group feeding a
  StdConv is approximate (named at that conv), and indeed its masked removal is not the
  masked original (the remaining weights are standardised over fewer channels)."""
  s = setup("stdconv")
  (g,) = [grp for grp in s.graph.prunable() if "params/conv0/kernel" in grp.producers]
  assert g.exactness == "approximate" and any("conv1" in e for e in g.effects), str(g)
  keep = {g.id: np.arange(0, g.width, 2)}
  model, variables = with_values(s, masked_tree(s, keep))
  inputs = s.spec.example(2, seed=7)
  want = logits(s.spec, model, variables, inputs)
  small = surgery.prune(model, variables, s.input_shape, keep)
  got = logits(s.spec, small.model, small.variables, inputs)
  assert not np.allclose(got, want, rtol=1e-3, atol=1e-3)


def test_zoo_bit_groupnorm_channels_go_in_whole_groups_and_stdconv_inputs_stay_approximate():
  """BiT (GroupNorm(4) before every weight-standardised conv): each group's channel is
  one norm group (its members' slices are blocks of width / 4 channels); a group that
  enters a StdConv is approximate, named at that conv (its kernel is standardised over
  the input channels); the last one (GroupNorm, then the Dense head) is exact."""
  s = setup("bit")
  groups = s.graph.prunable()
  assert len(groups) == len(s.graph.groups) - 1, str(s.graph)  # all but the logits
  for g in groups:
    assert g.width == 4, str(g)
    for m in g.members:
      r = m.index.shape[1]
      np.testing.assert_array_equal(m.index, np.arange(4 * r).reshape(4, r))
    std = sorted(p for p in g.consumers if "head" not in p)
    if std:
      assert g.exactness == "approximate", str(g)
      for p in std:
        layer = p.split("/", 1)[1].rsplit("/", 1)[0]
        assert any(e.endswith(f"at BiT/{layer}") for e in g.effects), (p, str(g))
    else:
      assert g.exactness == "exact" and "params/head/kernel" in g.consumers, str(g)


def test_zoo_gqa_heads_pruned_without_overrides_stop_in_one_line_naming_the_module():
  """The NNX rebuild does not guess which int of GQAttention counts what: narrowing a KV
  group without overrides= stops in one line naming the module path and type, its int
  attributes, and kv_heads (equal to the group's old width) as the likely override."""
  s = setup("llama")
  heads = [g for g in s.graph.groups if g.kind == "heads"]
  keep = {heads[-1].id: [1]}
  with pytest.raises(UserError) as e:
    surgery.prune(s.model, s.variables, s.input_shape, keep, call=s.call, graph=s.graph)
  message = str(e.value)
  layer = f"layers/{len(heads) - 1}/attn"
  assert "\n" not in message and f"'{layer}' (GQAttention)" in message, message
  assert "kv_heads=2 equals the 2 heads" in message and "overrides=" in message, message
  # With the counts given, it runs (and the masked-original check above covers values).
  small = surgery.prune(s.model, s.variables, s.input_shape, keep, call=s.call, graph=s.graph,
                        overrides={layer: {"heads": 2, "kv_heads": 1}})
  assert small.model.layers[-1].attn.heads == 2 and small.model.layers[0].attn.heads == 4


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_zoo_prune_to_on_shapes_only_variables_refuses_in_one_line(name):
  """jax.eval_shape / nnx.eval_shape variables (ShapeDtypeStruct leaves) carry no
  weights to rank or slice: prune_to says so in one line before any work."""
  s = setup(name)
  if s.variables is None:
    model = nnx.eval_shape(lambda: nnx.clone(s.model))
    variables = None
  else:
    model = s.model
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), s.variables)
  for run in (lambda: surgery.prune_to(model, variables, s.input_shape, call=s.call,
                                       flops_ratio=0.5),
              lambda: surgery.prune(model, variables, s.input_shape, {}, call=s.call)):
    with pytest.raises(UserError) as e:
      run()
    message = str(e.value)
    assert "\n" not in message and "ShapeDtypeStruct" in message, message
    assert "initialised variables" in message and "has shape ()" not in message, message


def test_zoo_map_probe_sized_by_its_input_joins_the_residual_group():
  """big_vision's MAP head creates its probe at (1, 1, x.shape[-1]) and tiles it over the
  batch into the query Dense: no op produces the probe's channels, so the graph ties
  them (and the query kernel's input axis) to the channels entering the head."""
  s = setup("vit_map")
  (res,) = [g for g in s.graph.groups if g.kind == "residual"
            and _member_group(s.graph, "params/pos_embedding", 2) is g]
  assert _member_group(s.graph, "params/map/probe", 2) is res, str(s.graph)
  assert _member_group(s.graph, "params/map/attn/query/kernel", 0) is res, str(s.graph)


def _vit_map_reference(params, x, heads=Z.HEADS):
  """The zoo ViTMAP's forward written from its parameters alone, at whatever widths they
  have (Flax's LayerNorm eps 1e-6, attention scaled by 1/sqrt(head_dim), tanh gelu):
  an independent reference for a rebuilt network."""
  def ln(p, y):
    m = y.mean(-1, keepdims=True)
    return (y - m) / jnp.sqrt(((y - m) ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"] \
        + p["bias"]

  def dense(p, y):
    return y @ p["kernel"] + p["bias"]

  def attn(p, q_in, kv_in):
    proj = {k: jnp.einsum("btd,dhk->bthk", y, p[k]["kernel"]) + p[k]["bias"]
            for k, y in (("query", q_in), ("key", kv_in), ("value", kv_in))}
    q = proj["query"] / jnp.sqrt(proj["query"].shape[-1])
    a = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, proj["key"]), -1)
    o = jnp.einsum("bhqs,bshk->bqhk", a, proj["value"])
    return jnp.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]

  def mlp(p, y):
    return dense(p["mlp2"], jax.nn.gelu(dense(p["mlp1"], y)))

  e = params["embed"]
  y = jax.lax.conv_general_dilated(x, e["kernel"], (4, 4), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + e["bias"]
  n, h, w, c = y.shape
  y = jnp.concatenate([jnp.tile(params["cls"], (n, 1, 1)), y.reshape(n, h * w, c)], 1)
  y = y + params["pos_embedding"]
  for i in range(Z.LAYERS):
    b = params[f"block{i}"]
    y = y + attn(b["attn"], ln(b["ln1"], y), ln(b["ln1"], y))
    y = y + mlp(b, ln(b["ln2"], y))
  y, m = ln(params["ln"], y), params["map"]
  z = attn(m["attn"], jnp.tile(m["probe"], (n, 1, 1)), y)
  return dense(params["head"], (z + mlp(m, ln(m["ln"], z)))[:, 0])


@pytest.mark.slow
def test_zoo_vit_map_residual_narrowed_without_the_map_heads_group_rebuilds():
  """The residual group 0 narrowed alone (random channels) while the MAP head's output
  group keeps its width: Flax attention sizes its output from the query input (the
  probe, in group 0) and the head's mlp2 is ``Dense(x.shape[-1])``, so the rebuild sets
  every Flax layer's sizes from its variables, changed or not. The pruned network is
  the reference forward at the pruned widths, has the predicted counts, and is reported
  approximate (LayerNorm statistics over fewer channels) -- it is not the masked
  original."""
  s = setup("vit_map")
  rng = np.random.default_rng()
  (res,) = [g for g in s.graph.groups if _member_group(s.graph, "params/map/probe", 2) is g]
  head = _member_group(s.graph, "params/head/kernel", 0)
  assert head is not res and head.width == res.width, str(s.graph)
  keep = {res.id: np.sort(rng.choice(res.width, int(rng.integers(1, res.width)),
                                     replace=False))}
  small = surgery.prune(s.model, s.variables, s.input_shape, keep, graph=s.graph)
  params = small.variables["params"]
  assert params["map"]["mlp2"]["kernel"].shape == (Z.MLP, head.width)
  assert params["map"]["probe"].shape == (1, 1, keep[res.id].size)
  assert flops.count(small.model, small.variables, s.input_shape) == s.graph.predict(keep)
  assert set(small.approximate) == {res.id} and any("ln1" in e for e in small.approximate[res.id])
  x = jnp.asarray(rng.normal(size=(2,) + Z.IMAGE), jnp.float32)
  np.testing.assert_allclose(_vit_map_reference(s.variables["params"], x),
                             s.model.apply(s.variables, x), **TOL)  # the reference is right
  np.testing.assert_allclose(small.model.apply(small.variables, x),
                             _vit_map_reference(params, x), **TOL)


class _Pool(nn.Module):
  @nn.compact
  def __call__(self, x):
    probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, x.shape[-1]))
    return nn.MultiHeadDotProductAttention(2, qkv_features=8, out_features=6, name="attn")(
        jnp.tile(probe, (x.shape[0], 1, 1)), x)


class _ProbePool(nn.Module):
  """No norms: the width entering the pool is an exact group with the probe in it."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(12, name="embed")(x)
    return nn.Dense(3, name="head")(_Pool(name="pool")(x)[:, 0])


def test_zoo_probe_tied_group_is_exact_and_gives_the_masked_originals_logits():
  model = _ProbePool()
  x = jax.random.normal(jax.random.key(int(np.random.default_rng().integers(1 << 30))),
                        (2, 5, 4))
  variables = model.init(jax.random.key(0), x)
  g = graph.trace(model, variables, (5, 4))
  (grp,) = [grp for grp in g.groups if "params/embed/kernel" in grp.producers]
  assert grp.prunable and grp.exactness == "exact", str(grp)
  assert _member_group(g, "params/pool/probe", 2) is grp, str(g)
  keep = {grp.id: np.sort(np.random.default_rng().choice(12, 5, replace=False))}
  removed = np.setdiff1d(np.arange(12), keep[grp.id])
  masked = jax.tree.map(np.array, variables)
  for m in grp.members:
    leaf = masked
    for k in m.path.split("/"):
      leaf = leaf[k]
    index = [slice(None)] * leaf.ndim
    index[m.axis] = np.asarray(m.index)[removed].ravel()
    leaf[tuple(index)] = 0
  want = model.apply(masked, x)
  small = surgery.prune(model, masked, (5, 4), keep, graph=g)
  assert small.variables["params"]["pool"]["probe"].shape == (1, 1, 5)
  np.testing.assert_allclose(small.model.apply(small.variables, x), want, **TOL)
  assert not np.allclose(model.apply(variables, x), want, **TOL)  # the mask mattered


class _PosEmb(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + self.param("pos", nn.initializers.normal(1.0), (1, x.shape[1], x.shape[-1]))


class _TokensEqualWidth(nn.Module):
  """A position table in a submodule, 8 tokens at width 8: its token axis (no producer,
  blocked as positions) has the extent of the channels entering the module."""

  @nn.compact
  def __call__(self, x):
    x = _PosEmb(name="posemb")(nn.Dense(8, name="embed")(x))
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(16, name="mlp")(x)).mean(1))


def test_zoo_a_position_tables_token_axis_is_never_tied_as_a_probe():
  model = _TokensEqualWidth()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 4)))
  g = graph.trace(model, variables, (8, 4))
  grp = _member_group(g, "params/embed/kernel", 1)
  assert grp.prunable and _member_group(g, "params/posemb/pos", 2) is grp, str(g)
  assert _member_group(g, "params/posemb/pos", 1) is None, str(g)


class _LinenGQA(nn.Module):
  """Grouped-query attention reading its head counts from int fields (Linen)."""
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 8

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    g, hd = self.heads // self.kv_heads, self.head_dim
    q = nn.Dense(self.heads * hd, use_bias=False, name="q")(x).reshape(n, t, self.kv_heads, g, hd)
    k = nn.Dense(self.kv_heads * hd, use_bias=False, name="k")(x).reshape(n, t, self.kv_heads, hd)
    v = nn.Dense(self.kv_heads * hd, use_bias=False, name="v")(x).reshape(n, t, self.kv_heads, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) / np.sqrt(hd)
    out = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, -1), v).reshape(n, t, -1)
    return nn.Dense(d, use_bias=False, name="o")(out)


class _LinenGQAModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name="embed")(x)
    x = x + _LinenGQA(name="attn")(x)
    return nn.Dense(3, name="head")(x.mean(1))


def test_zoo_linen_gqa_heads_need_overrides_and_then_equal_the_masked_original():
  """Linen likewise: one line naming 'attn' (_LinenGQA) with kv_heads as the hint; with
  the counts overridden the pruned network is the masked original (heads are exact)."""
  model = _LinenGQAModel()
  x = jax.random.normal(jax.random.key(int(np.random.default_rng().integers(1 << 30))),
                        (2, 6, 4))
  variables = model.init(jax.random.key(0), x)
  g = graph.trace(model, variables, (6, 4))
  (heads,) = [grp for grp in g.groups if grp.kind == "heads"]
  assert heads.width == 2 and heads.exactness == "exact", str(g)
  kept = int(np.random.default_rng().integers(2))
  keep = {heads.id: [kept]}
  with pytest.raises(UserError) as e:
    surgery.prune(model, variables, (6, 4), keep, graph=g)
  message = str(e.value)
  assert "\n" not in message and "'attn' (_LinenGQA)" in message, message
  assert "kv_heads=2 equals the 2 heads" in message, message
  masked = jax.tree.map(np.array, variables)
  for m in heads.members:
    leaf = masked
    for k in m.path.split("/"):
      leaf = leaf[k]
    index = [slice(None)] * leaf.ndim
    index[m.axis] = np.asarray(m.index)[1 - kept].ravel()
    leaf[tuple(index)] = 0
  small = surgery.prune(model, masked, (6, 4), keep, graph=g,
                        overrides={"attn": {"heads": 2, "kv_heads": 1}})
  np.testing.assert_allclose(small.model.apply(small.variables, x), model.apply(masked, x), **TOL)
  assert not np.allclose(model.apply(variables, x), model.apply(masked, x), **TOL)
