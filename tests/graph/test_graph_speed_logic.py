"""The vectorised graph code gives exactly what the per-channel code it replaced gave.

``graph.trace`` assembles its groups with numpy over all channels at once,
``Graph.predict`` is a few array operations over precomputed per-op factors, and
``importance.group_scores`` reduces each leaf axis once, in chunks. Each is compared
here with an independent slow reference (the per-channel / per-member loops, written
out) on random small networks and on the model zoo: the same groups in the same order
with the same members, reasons, exactness, effects, kinds and per-channel costs; the
same predicted counts; the same scores to float64 rounding, ranked alike. The rebuild's
one-pass slicing is compared with ``np.take`` axis by axis (bit-equal).
"""
import dataclasses
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import graph, surgery
from jaxprune.errors import UserError
from jaxprune.graph import group as group_lib
from jaxprune.graph import propagate
from jaxprune.surgery import importance
import zoo_models

rebuild_lib = importlib.import_module("jaxprune.surgery.rebuild")  # the module, not the function


# ------------------------------------------------------------ random small networks

def _random_net(rng):
  """A pure-function network of 3-5 random blocks on (tokens, width): residual MLPs,
  LayerNorm / RMSNorm, multi-head attention (heads x head_dim), a concat of two
  projections, an op the graph cannot follow (sort); a flatten or a mean at the end."""
  t, d_in, d = int(rng.integers(3, 6)), int(rng.integers(2, 6)), int(rng.integers(4, 9))
  params = {}
  n = lambda *s: np.asarray(rng.normal(size=s) * 0.3, np.float32)
  params["embed"] = {"kernel": n(d_in, d), "bias": n(d)}
  blocks = [str(b) for b in rng.choice(["mlp", "ln_mlp", "rms_attn", "concat", "sort"],
                                       int(rng.integers(3, 6)))]
  for i, b in enumerate(blocks):
    if b in ("mlp", "ln_mlp", "sort"):
      h = int(rng.integers(3, 10))
      params[f"b{i}"] = {"fc1": {"kernel": n(d, h), "bias": n(h)},
                         "fc2": {"kernel": n(h, d), "bias": n(d)}}
      if b == "ln_mlp":
        params[f"b{i}"]["ln"] = {"scale": n(d), "bias": n(d)}
    elif b == "rms_attn":
      heads, hd = int(rng.integers(1, 4)), int(rng.integers(2, 5))
      params[f"b{i}"] = {"rms": {"scale": n(d)},
                         **{k: {"kernel": n(d, heads, hd)} for k in ("q", "k", "v")},
                         "o": {"kernel": n(heads, hd, d)}}
    else:
      a, c = int(rng.integers(2, 6)), int(rng.integers(2, 6))
      params[f"b{i}"] = {"a": {"kernel": n(d, a)}, "c": {"kernel": n(d, c)},
                         "mix": {"kernel": n(a + c, d), "bias": n(d)}}
  flatten = bool(rng.integers(2))
  classes = int(rng.integers(2, 5))
  params["head"] = {"kernel": n(t * d if flatten else d, classes), "bias": n(classes)}

  def f(p, x):
    x = x @ p["embed"]["kernel"] + p["embed"]["bias"]
    for i, b in enumerate(blocks):
      q = p[f"b{i}"]
      if b in ("mlp", "ln_mlp", "sort"):
        y = x
        if b == "ln_mlp":
          mu = y.mean(-1, keepdims=True)
          y = (y - mu) / jnp.sqrt(((y - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
          y = y * q["ln"]["scale"] + q["ln"]["bias"]
        y = jax.nn.gelu(y @ q["fc1"]["kernel"] + q["fc1"]["bias"])
        if b == "sort":
          y = jnp.sort(y, axis=-1)
        x = x + y @ q["fc2"]["kernel"] + q["fc2"]["bias"]
      elif b == "rms_attn":
        y = x * jax.lax.rsqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * q["rms"]["scale"]
        qs, ks, vs = (jnp.einsum("btd,dhk->bthk", y, q[k]["kernel"]) for k in "qkv")
        s = jnp.einsum("bthk,bshk->bhts", qs, ks) / math.sqrt(qs.shape[-1])
        o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, -1), vs)
        x = x + jnp.einsum("bthk,hkd->btd", o, q["o"]["kernel"])
      else:
        y = jnp.concatenate([x @ q["a"]["kernel"], jax.nn.relu(x @ q["c"]["kernel"])], -1)
        x = x + y @ q["mix"]["kernel"] + q["mix"]["bias"]
    x = x.reshape(x.shape[0], -1) if flatten else x.mean(1)
    return x @ p["head"]["kernel"] + p["head"]["bias"]
  return f, params, (t, d_in)


def _zoo(name):
  """A zoo model's (model, abstract variables, input spec, call)."""
  z = zoo_models.BY_NAME[name]
  if z.api == "nnx":
    model, variables = z.build(0)
  else:
    model, variables = _abstract_linen(z)  # shapes suffice: no compiled init
  return model, variables, z.inputs, z.call(model)


def _abstract_linen(z):
  model = {"bit": zoo_models.BiT, "vit_map": zoo_models.ViTMAP, "vit_scan": zoo_models.ViTScan,
           "bert": zoo_models.BERT, "gpt": zoo_models.GPT, "lm1b": zoo_models.LM1B,
           "branch_resnet": zoo_models.BranchResNet, "dead_output": zoo_models.DeadOutputViT,
           "pmap_resnet": zoo_models.PmapResNet, "stdconv": zoo_models.StdConvNet}[z.name]()
  example = jax.tree.map(lambda s: jnp.zeros((1,) + tuple(s.shape), s.dtype), z.inputs)
  args = tuple(example.values()) if isinstance(example, dict) else (example,)
  return model, jax.eval_shape(lambda: model.init(jax.random.key(0), *args))


# ------------------------------------------------------------ the slow references

def _exactness(effects):
  """The one rule from effects to exactness (the graph's, where it has one)."""
  if hasattr(propagate, "exactness"):
    return propagate.exactness(effects)
  return "approximate" if effects else "exact"


def _slow_groups(traced, w, comp, leaf_ids, x_ids, out_ids):
  """The groups by a loop over every channel (component) and its slices, in call order."""
  reasons = {}
  for ids, reason in [(x_ids, "the model's input channels"),
                      (out_ids, "reaches the model's output")] + w.blocked:
    for c in np.unique(comp[ids]):
      reasons.setdefault(int(c), reason)
  produced = np.zeros(w.n, bool)
  consumed = np.zeros(w.n, bool)
  for ids in w.producers:
    produced[ids] = True
  for ids in w.consumers:
    consumed[ids] = True
  channel = set()
  for (leaf, axis), ids in leaf_ids.items():
    if produced[ids[0]]:
      channel.update(int(c) for c in comp[ids])
  slices = {}  # component -> [(leaf, axis, positions)], in (leaf, axis) order
  for (leaf, axis), ids in sorted(leaf_ids.items()):
    for pos, c in enumerate(comp[ids].tolist()):
      if c in channel:
        s = slices.setdefault(c, [])
        if s and s[-1][:2] == (leaf, axis):
          s[-1][2].append(pos)
        else:
          s.append((leaf, axis, [pos]))
  effects_of, marks_of = {}, {}
  for ids, what, where in w.effects:
    for c in np.unique(comp[ids]).tolist():
      line = f"{what} at {where}" if where else what
      if line not in effects_of.setdefault(c, []):
        effects_of[c].append(line)
  for ids, kind in w.marks:
    for c in np.unique(comp[ids]).tolist():
      marks_of.setdefault(c, set()).add(kind)
  dense = {op.kernel for op in w.ops if op.kind == "dense"}
  flops_of = np.zeros(comp.max() + 1)
  for op in w.ops:
    for factors, amount in ((op.factors, op.macs), (op.bias_factors, op.bias_adds)):
      for ids in factors:
        np.add.at(flops_of, comp[ids], amount / ids.size)
  by_signature = {}
  for c, members in slices.items():
    by_signature.setdefault(tuple((l, a, len(p)) for l, a, p in members), []).append(c)
  groups = []
  for signature, comps in by_signature.items():
    comps = sorted(comps, key=lambda c: slices[c][0][2][0])
    members, params = [], 0
    for k, (leaf, axis, r) in enumerate(signature):
      ids = leaf_ids[(leaf, axis)]
      role = "producer" if produced[ids[0]] else "consumer" if consumed[ids[0]] else "other"
      members.append(graph.Member(traced.paths[leaf], axis,
                                  np.array([slices[c][k][2] for c in comps], np.int64), role))
      if traced.is_param[leaf]:
        params += math.prod(traced.shapes[leaf]) // traced.shapes[leaf][axis] * r
    reason = next((reasons[c] for c in comps if c in reasons), None)
    effects = []
    for c in comps:
      effects += [e for e in effects_of.get(c, ()) if e not in effects]
    marks = set().union(*(marks_of.get(c, set()) for c in comps))
    groups.append(graph.Group(
        id=0, width=len(comps), members=tuple(members), prunable=reason is None,
        reason=reason, flops_per_channel=float(np.mean([flops_of[c] for c in comps])),
        params_per_channel=int(params), channels=np.asarray(comps, np.int64),
        exactness=_exactness(effects), effects=tuple(effects),
        kind=group_lib._kind(marks, [m.path for m in members if m.role == "producer"],  # pylint: disable=protected-access
                             dense)))
  first_op = {}
  for i, op in enumerate(w.ops):
    first_op.setdefault(op.kernel, i)
  groups.sort(key=lambda g: (min(first_op.get(p, len(w.ops)) for p in g.producers),
                             int(g.members[0].index.min())))
  return groups


def _slow_predict(g, keep):
  """FLOPs and params of a narrowing: every op's and leaf's kept fraction, one at a time."""
  kept = np.ones(g.components.max() + 1)
  for gid, channels in keep.items():
    mask = np.zeros(g.groups[gid].width)
    mask[np.asarray(channels, np.int64)] = 1
    kept[g.groups[gid].channels] = mask
  frac = lambda ids: float(kept[g.components[ids]].mean()) if ids.size else 1.0
  total = 0.0
  for op in g.ops:
    total += op.macs * math.prod(frac(f) for f in op.factors)
    total += op.bias_adds * math.prod(frac(f) for f in op.bias_factors)
  params = 0.0
  for leaf, (shape, is_param) in enumerate(zip(g.traced.shapes, g.traced.is_param)):
    if is_param:
      n = math.prod(shape)
      for axis in range(len(shape)):
        ids = g.leaf_ids.get((leaf, axis))
        if ids is not None:
          n *= frac(ids)
      params += n
  return {"flops": int(round(total)), "params": int(round(params))}


def _slow_scores(g, values, criterion, grads=None):
  """Per-member scores, each leaf read afresh for every group it belongs to."""
  out = {}
  for grp in g.prunable():
    params = [m for m in grp.members if dict(zip(g.traced.paths, g.traced.is_param))[m.path]]
    rows = lambda a, axis: np.moveaxis(np.asarray(a, np.float64), axis, 0).reshape(
        np.shape(a)[axis], -1)
    if criterion == "bn_scale":
      scales = [m for m in params if m.path.endswith("scale") and np.ndim(values[m.path]) == 1]
      if scales:
        out[grp.id] = sum(np.abs(rows(values[m.path], m.axis)[m.index, 0]).sum(1)
                          for m in scales)
      continue
    score = np.zeros(grp.width)
    for m in params:
      r = rows(values[m.path], m.axis)
      if criterion == "l1":
        score += np.abs(r).sum(1)[m.index].sum(1)
      elif criterion == "l2":
        score += (r ** 2).sum(1)[m.index].sum(1)
      else:
        score += np.abs((r * rows(grads[m.path], m.axis)).sum(1)[m.index].sum(1))
    out[grp.id] = np.sqrt(score) if criterion == "l2" else score
  return out


def _slow_kept_slices(g, keep):
  """Per leaf axis: every index minus the union, as Python ints, of the removed
  channels' indices of every member there."""
  removed = {}
  for gid, kept in keep.items():
    grp = g.groups[gid]
    gone = sorted(set(range(grp.width)) - set(int(c) for c in kept))
    for m in grp.members:
      for c in gone:
        removed.setdefault((m.path, m.axis), set()).update(int(i) for i in m.index[c].ravel())
  sizes = dict(zip(g.traced.paths, g.traced.shapes))
  out = {}
  for (path, axis), gone in removed.items():
    out.setdefault(path, {})[axis] = np.asarray(
        [i for i in range(sizes[path][axis]) if i not in gone], np.int64)
  return out


# ------------------------------------------------------------ comparisons

def _assert_same_scores(got, want):
  """The chunked sums add in another order than the reference's whole-leaf sums: equal
  to float64 rounding (~1e-16 relative to the terms), and the same ranking, ties (equal
  slices) included. Distinct channels of random weights never lie within 1e-12."""
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(np.argsort(-got, kind="stable"),
                                np.argsort(-want, kind="stable"))


def _assert_same_groups(fast, slow):
  assert len(fast) == len(slow)
  for i, (a, b) in enumerate(zip(fast, slow)):
    assert a.id == i
    assert (a.width, a.prunable, a.reason, a.params_per_channel, a.exactness, a.effects,
            a.kind) == (b.width, b.prunable, b.reason, b.params_per_channel, b.exactness,
                        b.effects, b.kind), i
    assert [type(e) for e in a.effects] == [type(e) for e in b.effects], i
    assert a.flops_per_channel == b.flops_per_channel, i  # bit-identical
    np.testing.assert_array_equal(a.channels, b.channels)
    assert [(m.path, m.axis, m.role) for m in a.members] == \
        [(m.path, m.axis, m.role) for m in b.members], i
    for m, n in zip(a.members, b.members):
      assert m.index.dtype == n.index.dtype and m.index.shape == n.index.shape
      np.testing.assert_array_equal(m.index, n.index)


def _random_keeps(g, rng, count):
  """`count` random narrowings: each prunable group keeps a random subset, or all."""
  out = [{}]
  for _ in range(count):
    keep = {}
    for grp in g.prunable():
      if rng.uniform() < 0.7:
        n = int(rng.integers(1, grp.width + 1))
        keep[grp.id] = rng.choice(grp.width, n, replace=False)
    out.append(keep)
  return out


def _check(model, variables, input_shape, call, rng):
  g = graph.trace(model, variables, input_shape, call)
  w, leaf_ids, x_ids, out_ids, comp = group_lib.channels(g.traced)
  _assert_same_groups(g.groups, _slow_groups(g.traced, w, comp, leaf_ids, x_ids, out_ids))
  for keep in _random_keeps(g, rng, 6):
    assert g.predict(keep) == _slow_predict(g, keep)
    want, got = _slow_kept_slices(g, keep), graph.kept_slices(g, keep)
    assert {p: sorted(a) for p, a in got.items()} == {p: sorted(a) for p, a in want.items()}
    for path, axes in want.items():
      for axis, idx in axes.items():
        assert got[path][axis].dtype == np.int64
        np.testing.assert_array_equal(got[path][axis], idx)
  return g


def test_random_networks_give_the_per_channel_groups_predictions_and_scores():
  rng = np.random.default_rng()
  for _ in range(4):
    f, params, shape = _random_net(rng)
    g = _check(f, params, shape, None, rng)
    values = graph.named_leaves(f, params)
    if rng.integers(2):  # numpy float64 leaves: the scores must not change them in place
      values = {k: np.asarray(v, np.float64) for k, v in values.items()}
    before = {k: np.array(v) for k, v in values.items()}
    grads = {k: np.asarray(rng.normal(size=np.shape(v)), np.float32) for k, v in values.items()}
    for criterion in ("l1", "l2", "taylor", "bn_scale"):
      want = _slow_scores(g, values, criterion, grads)
      if criterion == "bn_scale" and len(want) < len(g.prunable()):
        continue  # a group without a scale is an error there, tested elsewhere
      importance.CHUNK = int(rng.choice([1, 3, 64, 1 << 17]))  # leaves read in chunks
      rebuild_lib.PARALLEL_BYTES = int(rng.choice([0, 1 << 26]))  # 0: on threads
      try:
        got = importance.group_scores(g, values, criterion, grads=grads)
      finally:
        importance.CHUNK, rebuild_lib.PARALLEL_BYTES = 1 << 17, 1 << 26
      assert got.keys() == want.keys()
      for k in want:
        _assert_same_scores(got[k], want[k])
    for k, v in before.items():
      np.testing.assert_array_equal(values[k], v)


@pytest.mark.parametrize("name", ["bit", "vit_map", "vit_scan", "bert", "gpt", "llama",
                                  "lm1b", "branch_resnet", "pmap_resnet"])
def test_zoo_models_give_the_per_channel_groups_and_predictions(name):
  model, variables, inputs, call = _zoo(name)
  _check(model, variables, inputs, call, np.random.default_rng())


@pytest.mark.parametrize("draw", ["key", "raw uint32 key", "rbg key"])
def test_random_scores_are_the_per_group_draws(draw):
  """The scores drawn in numpy for all groups at once are each group's own
  ``jax.random.uniform(fold_in(key, id))``, for a typed and a raw threefry key; an
  rbg key's are drawn by JAX."""
  rng = np.random.default_rng()
  f, params, shape = _random_net(rng)
  g = graph.trace(f, params, shape)
  seed = int(rng.integers(2 ** 31))
  key = {"key": lambda: jax.random.key(seed), "raw uint32 key": lambda: jax.random.PRNGKey(seed),
         "rbg key": lambda: jax.random.key(seed, impl="rbg")}[draw]()
  groups = g.prunable() + [dataclasses.replace(g.groups[0], id=int(rng.integers(2 ** 31)),
                                               width=int(rng.integers(1, 5000)))]
  got = importance.group_scores(g, {}, "random", key=key, groups=groups)
  assert list(got) == [grp.id for grp in groups]
  for grp in groups:
    want = np.asarray(jax.random.uniform(jax.random.fold_in(key, grp.id), (grp.width,)))
    assert got[grp.id].dtype == want.dtype and got[grp.id].shape == want.shape
    np.testing.assert_array_equal(got[grp.id], want)


# ------------------------------------------------------------ the rebuild's slicing and check

def test_one_pass_slicing_is_take_axis_by_axis():
  """``rebuild``'s slicing (every sliced axis in one pass into a new aligned array,
  blocks of the first axis through a small intermediate) gives, bit for bit, what
  ``np.take`` axis after axis gives: random shapes, axes, kept sets, dtypes, strided
  inputs, tiny blocks, and a leaf past the 4 MiB mmap threshold. The input is untouched;
  on a CPU the JAX array is the result itself (no copy). ``slice_tree`` of many leaves
  at once, on threads, gives the same arrays, and the first bad leaf's error."""
  rng = np.random.default_rng()
  cases = [tuple(int(n) for n in rng.integers(1, 7, rng.integers(1, 5))) for _ in range(40)]
  cases.append((1100, 1000))  # 4.4 MB of float32: the mmap path
  for shape in cases:
    dtype = rng.choice([np.float32, jnp.bfloat16, np.int32])
    x = np.asarray(rng.normal(size=shape) * 10, dtype)
    if len(shape) > 1 and rng.integers(2):  # a strided view (e.g. a transposed leaf)
      x = np.swapaxes(np.asarray(rng.normal(size=shape[::-1]) * 10, dtype), 0, -1)
      x = np.moveaxis(x, -1, 0) if x.shape != shape else x
    before = x.copy()
    spec = {}
    for axis in rng.permutation(x.ndim)[:rng.integers(1, x.ndim + 1)]:
      n = x.shape[axis]
      spec[int(axis) - (x.ndim if rng.integers(2) else 0)] = np.sort(
          rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
    want = x
    for axis, idx in spec.items():
      want = np.take(want, idx, axis=axis)
    rebuild_lib.GATHER_CHUNK = int(rng.choice([1, 16, 1 << 20]))
    try:
      got = rebuild_lib._slice_leaf("leaf", x, spec)
    finally:
      rebuild_lib.GATHER_CHUNK = 1 << 20
    assert got.dtype == want.dtype and got.flags.c_contiguous and got.ctypes.data % 64 == 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(x, before)
    on_device = rebuild_lib._to_device(got)
    np.testing.assert_array_equal(np.asarray(on_device), want)
    if jax.default_backend() == "cpu" and got.dtype != np.float64:
      assert on_device.unsafe_buffer_pointer() == got.ctypes.data
  tree = {f"leaf{i}": np.asarray(rng.normal(size=shape), np.float32)
          for i, shape in enumerate(cases[:20])}
  slices = {k: {0: np.sort(rng.choice(v.shape[0], int(rng.integers(1, v.shape[0] + 1)),
                                      replace=False))} for k, v in tree.items()}
  want = {k: np.take(v, slices[k][0], axis=0) for k, v in tree.items()}
  bad = sorted(rng.choice(list(tree), 2, replace=False))  # a dict's leaves: sorted keys
  rebuild_lib.PARALLEL_BYTES = 0
  try:
    got = rebuild_lib.slice_tree(tree, slices)
    for k in tree:
      np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(UserError, match=f"kept indices of {bad[0]} axis 0 must be sorted"):
      rebuild_lib.slice_tree(tree, {**slices, **{k: {0: np.array([0, 0])} for k in bad}})
  finally:
    rebuild_lib.PARALLEL_BYTES = 1 << 26


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="out")(nn.relu(nn.Dense(6, name="fc")(x)))


class _ApplyOnlyWidth(nn.Module):
  """Uses a width of 6 outside ``init`` only: ``init`` at the pruned width passes."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name="fc")(x)
    if self.is_initializing():
      return h
    return h @ jnp.ones((6, 2))


class _ReluAtSix(nn.Module):
  """The ReLU is applied only when the width is 6: another graph at other widths."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name="fc")(x)
    if h.shape[-1] == 6:
      h = nn.relu(h)
    return nn.Dense(2, name="out")(h)


def test_rebuild_check_still_catches_wrong_networks():
  """The check traces the pruned network's ``apply`` once (that it runs, and that its
  primitives are the original's): slices that are not a whole group, a network that
  fails only in ``apply``, and one whose graph changes at the pruned width are each
  refused in one line; the whole group's slices pass and give the masked original."""
  rng = np.random.default_rng()
  kept = np.sort(rng.choice(6, int(rng.integers(1, 6)), replace=False))
  x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  group = {"params/fc/kernel": {1: kept}, "params/fc/bias": {0: kept},
           "params/out/kernel": {0: kept}}
  fc_only = {k: v for k, v in group.items() if "/fc/" in k}
  errors = []
  for model, slices, message in [(_Mlp(), fc_only, "not consistent"),
                                 (_ApplyOnlyWidth(), fc_only, "does not run"),
                                 (_ReluAtSix(), group, "another graph")]:
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(UserError, match=message) as e:
      surgery.rebuild(model, variables, slices, (5,))
    errors.append(str(e.value))
  assert all("\n" not in e for e in errors)
  model = _Mlp()
  variables = model.init(jax.random.key(1), x)
  small = surgery.rebuild(model, variables, group, (5,))
  gone = np.setdiff1d(np.arange(6), kept)
  masked = jax.tree.map(np.array, variables)
  masked["params"]["fc"]["kernel"][:, gone] = 0
  masked["params"]["fc"]["bias"][gone] = 0
  np.testing.assert_allclose(small.model.apply(small.variables, x),
                             model.apply(masked, x), rtol=1e-6, atol=1e-6)
