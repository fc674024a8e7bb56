"""TAS on any model (jaxprune.search): the generic supernet against the dedicated one,
closed forms of the costs and the mix, and user models in Linen and NNX."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import flops, kernels, models, search
from jaxprune.search import Selection
from jaxprune.optim import selection as selection_lib
import zoo

jax.config.update("jax_disable_most_optimizations", True)


def _plain_and_tas(seed, depth=8):
  """cifar_resnet(depth) with random weights and statistics, and the TASResNet holding
  the same values (every candidate row equal; the search-only shortcut BN an identity)."""
  rng = np.random.default_rng(seed)
  plain = models.cifar_resnet(depth, 10)
  tas = models.tas_cifar_resnet(depth, 10)
  x0 = jnp.zeros((1, 32, 32, 3))
  pv = plain.init(jax.random.key(seed), x0, train=False)
  pv = jax.tree_util.tree_map_with_path(
      lambda p, a: (rng.uniform(0.5, 1.5, a.shape) if selection_lib.leaf_path(p).endswith(
          ("var", "scale")) else rng.normal(0, 0.2, a.shape) if selection_lib.leaf_path(
              p).endswith(("mean", "bias")) else np.asarray(a)).astype(np.float32), pv)
  tv = jax.device_get(tas.init(jax.random.key(0), x0, train=False, tau=1.0,
                               key=jax.random.key(1)))
  tv = jax.tree.map(np.array, tv)

  def plain_name(tas_path):
    parts = tas_path.split("/")
    if parts[0] == "stem":
      return f"stem_{parts[1]}/{parts[2]}"
    if parts[0] == "classifier":
      return tas_path
    block, layer, kind, leaf = parts
    if layer == "shortcut":
      return None if kind == "bn" else f"{block}/shortcut_conv/{leaf}"
    return f"{block}/{layer if kind == 'conv' else 'bn_' + layer[-1]}/{leaf}"

  for collection in ("params", "batch_stats"):
    flat = {selection_lib.leaf_path(p): leaf for p, leaf in
            jax.tree_util.tree_flatten_with_path(tv[collection])[0]}
    plain_flat = {selection_lib.leaf_path(p): leaf for p, leaf in
                  jax.tree_util.tree_flatten_with_path(pv[collection])[0]}
    for path, leaf in flat.items():
      name = plain_name(path)
      if name is None:  # the shortcut's search-only BN: identity in eval mode
        leaf[...] = {"scale": 1.0, "bias": 0.0, "mean": 0.0,
                     "var": 1.0 - 1e-5}[path.split("/")[-1]]
        continue
      src = np.asarray(plain_flat[name])
      leaf[...] = np.broadcast_to(src, leaf.shape) if leaf.ndim == src.ndim + 1 else src
  return plain, pv, tas, tv


def _fixed(tas_model, selections, depth_probs=None):
  """TASResNet that uses given width picks (and depth weights) instead of sampling."""
  class Fixed(type(tas_model)):
    def sample(self, arch, tau, key):
      return list(selections), list(depth_probs) if depth_probs is not None else [
          jnp.ones((1,))] * len(self.full_depths)
  return Fixed(**{f: getattr(tas_model, f) for f in
                  ("depth", "block", "num_classes", "num_picks", "dtype", "precision",
                   "layout")})


@pytest.mark.slow
def test_generic_search_on_cifar_resnet_equals_tas_resnet_with_tied_picks():
  seed = int(np.random.randint(1 << 30))
  rng = np.random.default_rng(seed)
  plain, pv, tas, tv = _plain_and_tas(seed)
  space = search.SearchSpace(plain, pv, (32, 32, 3))
  # The graph's groups: the stage-0 residual stream (stem + conv_b) and one per conv_a /
  # per stage's conv_b + shortcut.
  assert space.names == ["stem_conv", "stage0_block0/conv_a", "stage1_block0/conv_a",
                         "stage1_block0/conv_b", "stage2_block0/conv_a",
                         "stage2_block0/conv_b"]
  picks = []
  for cands in space.candidates:
    idx = rng.choice(len(cands), 2, replace=False)
    w = rng.dirichlet([1.0, 1.0]).astype(np.float32)
    picks.append(Selection(jnp.asarray(idx, jnp.int32), jnp.asarray(w),
                           jnp.asarray(np.asarray(cands)[idx], jnp.int32)))
  # TASResNet's convs in widths order: stem, s0 a, s0 b, s1 a, s1 b, s2 a, s2 b.
  group_of_conv = [0, 1, 0, 2, 3, 4, 5]
  x = jax.random.normal(jax.random.key(seed), (3, 32, 32, 3))

  def generic(weights, params):
    sel = [p._replace(weights=w) for p, w in zip(picks, weights)]
    return space.apply({**pv, "params": params}, x, train=False, selections=sel)

  def dedicated(weights, params):
    sel = [picks[g]._replace(weights=weights[g]) for g in group_of_conv]
    return _fixed(tas, sel).apply({**tv, "params": params}, x, train=False, tau=1.0,
                                  key=jax.random.key(0))
  weights = [p.weights for p in picks]
  ours = jax.jit(generic)(weights, pv["params"])
  theirs = jax.jit(dedicated)(weights, tv["params"])
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(ours).max()) > 1e-2
  # Gradients: of the mixing weights (which carry the architecture gradient, §2) and of
  # a conv kernel.
  loss = lambda f: (lambda w, p: jnp.sum(f(w, p) * jnp.arange(10.0)))
  gw, gp = jax.jit(jax.grad(loss(generic), argnums=(0, 1)))(weights, pv["params"])
  tw, tp = jax.jit(jax.grad(loss(dedicated), argnums=(0, 1)))(weights, tv["params"])
  for a, b in zip(gw, tw):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(gp["stage1_block0"]["conv_a"]["kernel"],
                             tp["stage1_block0"]["conv_a"]["conv"]["kernel"],
                             rtol=2e-3, atol=2e-4)

  # Costs: TASResNet's E_cost / F_cost with the logits tied across each group.
  arch = space.init_arch(jax.random.key(seed))
  alphas = [rng.normal(0, 1, len(c)).astype(np.float32) for c in space.candidates]
  arch = {"width_logits": dict(zip(space.names, alphas))}
  tas_arch = jax.tree.map(np.array, tv["arch"])
  for path, g in zip(tas.conv_paths(), group_of_conv):
    node = tas_arch["width_logits"]
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = alphas[g]
  np.testing.assert_allclose(space.expected_cost(arch),
                             search.tas_expected_cost(tas, tas_arch, (32, 32, 3)), rtol=1e-5)
  assert int(round(float(space.argmax_cost(arch)))) == search.tas_argmax_cost(
      tas, tas_arch, (32, 32, 3))
  ge = jax.grad(space.expected_cost)(arch)["width_logits"]
  te = jax.grad(lambda a: search.tas_expected_cost(tas, a, (32, 32, 3)))(tas_arch)
  te = [n for n in tas.width_logits(te)]
  for s, name in enumerate(space.names):
    summed = sum(te[i] for i, g in enumerate(group_of_conv) if g == s)
    np.testing.assert_allclose(ge[name], summed, rtol=1e-4, atol=1e-2)


def test_expected_cost_is_the_closed_form_of_a_two_layer_net():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.Conv(10, (3, 3), use_bias=False, name="c1")(x))
      x = nn.relu(nn.Conv(20, (1, 1), use_bias=False, name="c2")(x))
      return nn.Dense(3, name="fc")(x.mean((1, 2)))
  net = Net()
  v = net.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))
  space = search.SearchSpace(net, v, (5, 5, 2))
  rng = np.random.default_rng(int(np.random.randint(1 << 30)))
  alphas = [rng.normal(0, 1, len(c)).astype(np.float32) for c in space.candidates]
  arch = {"width_logits": dict(zip(space.names, alphas))}
  e = [float(jax.nn.softmax(a) @ np.asarray(c, np.float32))
       for a, c in zip(alphas, space.candidates)]
  closed = 9 * 2 * e[0] * 25 + 1 * e[0] * e[1] * 25 + e[1] * 3
  np.testing.assert_allclose(space.expected_cost(arch), closed, rtol=1e-5)
  w = [c[int(np.argmax(a))] for a, c in zip(alphas, space.candidates)]
  exact = 9 * 2 * w[0] * 25 + w[0] * w[1] * 25 + w[1] * 3 + 3
  assert float(space.argmax_cost(arch)) == pytest.approx(exact)
  assert space.graph.predict(space.keep(arch))["flops"] == exact


def test_the_mix_is_cwi_of_the_picked_prefixes():
  """The searched producer's output, against CWI written out by hand (tas.md §3-§4)."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      y = nn.Dense(10, name="d1")(x)
      self.sow("intermediates", "mixed", y)
      return nn.Dense(2, name="d2")(nn.relu(y))
  net = Net()
  seed = int(np.random.randint(1 << 30))
  x = jax.random.normal(jax.random.key(seed), (4, 6))
  v = net.init(jax.random.key(seed), x)
  space = search.SearchSpace(net, {"params": v["params"]}, (6,))
  (cands,) = space.candidates
  ia, ib = 2, 5
  wa = 0.3
  sel = [Selection(jnp.asarray([ia, ib]), jnp.asarray([wa, 1 - wa]),
                   jnp.asarray([cands[ia], cands[ib]], jnp.int32))]
  out = space.apply({"params": v["params"]}, x, train=False, selections=sel)
  y = np.asarray(x @ v["params"]["d1"]["kernel"] + v["params"]["d1"]["bias"])
  c_max = cands[ib]
  mixed = np.zeros_like(y)
  for w, c in ((wa, cands[ia]), (1 - wa, cands[ib])):
    mixed[:, :c_max] += w * np.asarray(kernels.cwi(jnp.asarray(y[:, :c]), c_max))
  expected = np.maximum(mixed, 0) @ v["params"]["d2"]["kernel"] + v["params"]["d2"]["bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain_cnn", "resnet_basic", "vit"])
def test_search_on_user_models_linen_and_nnx(name):
  """Any zoo model, Linen and its NNX twin: the full-width picks give the model's own
  logits exactly; random picks give the same logits in both; a search step's
  gradients reach every searched group's logits."""
  arch_def = zoo.BY_NAME[name]
  lin, lv = zoo.init_linen(arch_def, seed=1)
  mod = zoo.init_nnx(arch_def, seed=1)
  x = zoo.example(arch_def, batch=3, seed=2)
  spaces = [search.SearchSpace(lin, lv, arch_def.input_shape),
            search.SearchSpace(mod, None, arch_def.input_shape)]
  assert spaces[0].names == spaces[1].names and spaces[0].names
  full = [Selection(jnp.asarray([len(c) - 1, 0]), jnp.asarray([1.0, 0.0]),
                    jnp.asarray([c[-1], c[0]], jnp.int32)) for c in spaces[0].candidates]
  for sp in spaces:
    own = sp.model.apply(sp.variables, x, train=False)
    np.testing.assert_allclose(sp.apply(sp.variables, x, train=False, selections=full), own,
                               rtol=1e-5, atol=1e-5)
  arch = spaces[0].init_arch(jax.random.key(0))
  outs = [sp.apply(sp.variables, x, arch, train=False, tau=1.0, key=jax.random.key(3))
          for sp in spaces]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(spaces[0].expected_cost(arch), spaces[1].expected_cost(arch),
                             rtol=1e-6)
  sp = spaces[0]

  def loss(a):
    logits, _ = sp.apply(sp.variables, x, a, train=True, tau=5.0, key=jax.random.key(4))
    return jnp.mean(logits ** 2) + 1e-7 * sp.expected_cost(a)
  grads = jax.jit(jax.grad(loss))(arch)
  for n, g in grads["width_logits"].items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), n
  for n, g in grads.get("depth_logits", {}).items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), n
  if name == "vit":  # attention heads put channels on two axes: left at full width
    assert sp.excluded
    # Its residual adds are inline in the ViT module: no block module to skip.
    assert not sp.stages and all("modules of their own" in r
                                 for r in sp.excluded_stages.values())
  # Depth: the stages of identity blocks (resnet_basic: s1's two blocks; s2's projection
  # block then one identity block), the same in Linen and NNX.
  want = {"plain_cnn": [], "vit": [], "resnet_basic": ["s1b0..s1b1", "s2b1"]}[name]
  assert spaces[0].depth_names == spaces[1].depth_names == want
  if want:
    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    arch = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 1, a.shape), jnp.float32), arch)
    from jaxprune import flops
    counts = []
    for sp in spaces:
      model, variables = sp.derived_network(arch)
      counts.append(flops.count(model, variables, arch_def.input_shape)["flops"])
      assert counts[-1] == sp.predict(arch) == int(round(float(sp.argmax_cost(arch))))
    assert counts[0] == counts[1] < spaces[0].flops_max


def test_num_picks_and_empty_space_are_errors():
  from jaxprune.errors import UserError
  plain = models.cifar_resnet(8, 10)
  pv = jax.eval_shape(lambda: plain.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                         train=False))
  with pytest.raises(UserError, match="num_picks"):
    search.SearchSpace(plain, pv, (32, 32, 3), num_picks=0)
  # 9 candidates at most per group: |I| = 9 leaves nothing to search.
  with pytest.raises(UserError, match="no searchable channel group"):
    search.SearchSpace(plain, pv, (32, 32, 3), num_picks=9)


def test_default_round_to_leaves_narrow_groups_whole_while_the_ratio_is_reachable():
  """Graph space at a backend-default round_to (fit_round_to) with the search's FLOPs
  ratio: a group not wider than round_to is left whole exactly when the other group's
  smallest candidate reaches the ratio (the closed form of a two-conv net, random
  widths); else, and without a ratio, it is searched at its fitted candidates."""
  import flax.linen as nn
  rng = np.random.default_rng()
  w1, w2, r = int(rng.integers(4, 17)), int(rng.integers(17, 41)), 16

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.Conv(w1, (3, 3), use_bias=False, name="c1")(x))
      x = nn.relu(nn.Conv(w2, (1, 1), use_bias=False, name="c2")(x))
      return nn.Dense(3, name="fc")(x.mean((1, 2)))
  net = Net()
  v = net.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))
  flops = lambda a, b: 9 * 2 * a * 25 + a * b * 25 + b * 3 + 3
  low = flops(w1, search.base.fitted_candidates(w2, r, 2)[0]) / flops(w1, w2)
  for ratio, whole in ((min(1.0, low * rng.uniform(1.0, 1.05)), True),
                       (low * rng.uniform(0.8, 0.99), False)):
    space = search.SearchSpace(net, v, (5, 5, 2), round_to=r, fit_round_to=True,
                               target_ratio=ratio)
    searched = {g.width: c for g, c in zip(space.groups, space.candidates)}
    assert (w1 not in searched) == whole, (w1, w2, ratio, low)
    if whole:
      assert any("backend's default: left whole" in why for why in space.excluded.values())
    else:
      assert searched[w1] == search.base.fitted_candidates(w1, r, 2)
  plain = search.SearchSpace(net, v, (5, 5, 2), round_to=r, fit_round_to=True)
  assert [g.width for g in plain.groups] == [w1, w2]


def test_default_round_to_narrow_groups_whole_when_the_ratio_is_reachable_by_depth():
  """The same rule on a depth-searched ResNet-14: reachability counts every searched
  stage at its smallest depth (the search removes blocks too). The two edges come from
  flops.count of the derived networks (narrow groups at full width, the others at their
  smallest candidates, every stage at its smallest or full depth) of the space that
  searches every group: a ratio between them leaves the narrow groups whole, one under
  the lower searches them."""
  rng = np.random.default_rng()
  r, shape = 16, (8, 8, 3)
  net = models.cifar_resnet(14)
  v = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))
  every = search.SearchSpace(net, v, shape, round_to=r, fit_round_to=True)
  assert every.stages
  narrow = [g.width <= r for g in every.groups]
  assert any(narrow) and not all(narrow)

  def ratio(depth_pick):
    widths = {n: np.eye(len(c))[-1 if wide else 0] * 30 for n, c, wide in
              zip(every.names, every.candidates, narrow)}
    depths = {n: np.eye(len(c))[depth_pick] * 30
              for n, c in zip(every.depth_names, every.depth_candidates)}
    model, small = every.derived_network({"width_logits": widths, "depth_logits": depths})
    return (flops.count(model, small, shape)["flops"]
            / flops.count(net, v, shape)["flops"])
  low, high = ratio(0), ratio(-1)
  assert low < high
  for target, whole in ((rng.uniform(low, high), True), (low * rng.uniform(1, 1.02), True),
                        (low * rng.uniform(0.8, 0.99), False)):
    space = search.SearchSpace(net, v, shape, round_to=r, fit_round_to=True,
                               target_ratio=target)
    got = sorted({g.id for g in every.groups} - {g.id for g in space.groups})
    want = sorted(g.id for g, n in zip(every.groups, narrow) if n) if whole else []
    assert got == want, (target, low, high)
    assert space.depth_names == every.depth_names


def test_round_to_candidates():
  assert search.rounded_candidates(64) == (19, 25, 32, 38, 44, 51, 57, 64)
  assert search.rounded_candidates(64, 8) == (24, 32, 40, 48, 56, 64)
  assert search.rounded_candidates(20, 16) == (16, 20)


@pytest.mark.slow
def test_depth_search_on_cifar_resnet_equals_tas_resnet():
  """ResNet-20: three stages of three blocks, depth candidates (1, 2, 3) each, found in
  the graph (stage 0 from identity blocks only, stages 1-2 after a projection block);
  logits, gradients of the width and depth weights, and both costs equal TASResNet's
  with tied width picks."""
  seed = int(np.random.randint(1 << 30))
  rng = np.random.default_rng(seed)
  plain, pv, tas, tv = _plain_and_tas(seed, depth=20)
  space = search.SearchSpace(plain, pv, (32, 32, 3))
  assert space.depth_names == ["stage0_block0..stage0_block2", "stage1_block1..stage1_block2",
                               "stage2_block1..stage2_block2"]
  assert space.depth_candidates == [(1, 2, 3)] * 3 == tas.stage_candidates()
  picks = []
  for cands in space.candidates:
    idx = rng.choice(len(cands), 2, replace=False)
    picks.append(Selection(jnp.asarray(idx, jnp.int32),
                           jnp.asarray(rng.dirichlet([1.0, 1.0]), jnp.float32),
                           jnp.asarray(np.asarray(cands)[idx], jnp.int32)))
  group_of_conv = [space._group_of_kernel[f"params/{n}/kernel"] for n in (
      ["stem_conv"] + [f"{'/'.join(p)}" for p in tas.conv_paths()[1:]])]
  probs = [jnp.asarray(rng.dirichlet([1.0] * 3), jnp.float32) for _ in range(3)]
  x = jax.random.normal(jax.random.key(seed), (2, 32, 32, 3))

  def generic(weights, probs):
    sel = [p._replace(weights=w) for p, w in zip(picks, weights)]
    return space.apply(pv, x, train=False, selections=sel, depth_probs=probs)

  def dedicated(weights, probs):
    sel = [picks[g]._replace(weights=weights[g]) for g in group_of_conv]
    return _fixed(tas, sel, probs).apply(tv, x, train=False, tau=1.0, key=jax.random.key(0))
  weights = [p.weights for p in picks]
  ours, theirs = jax.jit(generic)(weights, probs), jax.jit(dedicated)(weights, probs)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  full = jax.jit(generic)(weights, [jnp.asarray([0.0, 0.0, 1.0])] * 3)
  assert float(jnp.abs(ours - full).max()) > 1e-3  # the depth mix matters
  loss = lambda f: (lambda w, q: jnp.sum(f(w, q) * jnp.arange(10.0)))
  gw, gq = jax.jit(jax.grad(loss(generic), argnums=(0, 1)))(weights, probs)
  tw, tq = jax.jit(jax.grad(loss(dedicated), argnums=(0, 1)))(weights, probs)
  for a, b in zip(gw + gq, tw + tq):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)

  # Costs with random width (tied) and depth logits.
  from jaxprune import flops
  alphas = [rng.normal(0, 1, len(c)).astype(np.float32) for c in space.candidates]
  betas = [rng.normal(0, 1, 3).astype(np.float32) for _ in range(3)]
  arch = {"width_logits": dict(zip(space.names, alphas)),
          "depth_logits": dict(zip(space.depth_names, betas))}
  tas_arch = jax.tree.map(np.array, tv["arch"])
  for path, g in zip(tas.conv_paths(), group_of_conv):
    node = tas_arch["width_logits"]
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = alphas[g]
  for s, b in enumerate(betas):
    tas_arch["depth_logits"][f"stage{s}"] = b
  np.testing.assert_allclose(space.expected_cost(arch),
                             search.tas_expected_cost(tas, tas_arch, (32, 32, 3)), rtol=1e-5)
  assert space.predict(arch) == search.tas_argmax_cost(tas, tas_arch, (32, 32, 3))
  ge = jax.grad(space.expected_cost)(arch)["depth_logits"]
  te = jax.grad(lambda a: search.tas_expected_cost(tas, a, (32, 32, 3)))(tas_arch)
  for s, name in enumerate(space.depth_names):
    want = np.asarray(te["depth_logits"][f"stage{s}"])
    # float32 sums of terms ~1e5 that cancel: the error scales with the largest entry
    # (a middle entry of -976.375 vs -976.5 next to +-2.3e5 failed a fixed atol of 1e-2).
    np.testing.assert_allclose(ge[name], want, rtol=1e-4,
                               atol=1e-2 + 4e-6 * float(np.abs(want).max()))
  # The derived network skips the blocks beyond the argmax depths; its FLOPs are F_cost.
  model, variables = space.derived_network(arch)
  assert flops.count(model, variables, (32, 32, 3))["flops"] == space.predict(arch)
  kept = {k for k in variables["params"] if k.startswith("stage")}
  for name, d, cands in zip(["stage0", "stage1", "stage2"], space.derive_depths(arch),
                            space.depth_candidates):
    assert {k for k in kept if k.startswith(name)} == {f"{name}_block{b}" for b in range(d)}
