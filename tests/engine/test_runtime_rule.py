"""The runtime rule (issue 24): the XLA:CPU conv flag per model, from its op profile;
the backend's default round_to; TAS's rounded candidates; the alternated speed-up."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import conftest
from jaxprune.engine import report, runtime
from jaxprune.methods import tas
from jaxprune import flops, latency
from jaxprune.search import base as search_base


def test_rule_picks_the_faster_setting_on_recorded_timings():
  """On every recorded model and batch where the two settings differ beyond the noise
  (more than 10% and more than twice the stock/control spread of identical programs,
  or NOISE_WITHOUT_CONTROL where no control ran), the rule picks the faster one; the
  records include a model the flag speeds up and one it slows down."""
  differ = {True: 0, False: 0}
  for name, rec in runtime.RECORDED.items():
    for batch, (stock_ms, eigen_ms, control_ms) in rec["ms"].items():
      pick_eigen = runtime.eigen_convs_faster(rec["profile"], batch)
      noise = (abs(np.log(stock_ms / control_ms)) if control_ms is not None
               else np.log(runtime.NOISE_WITHOUT_CONTROL))
      if abs(np.log(stock_ms / eigen_ms)) <= max(np.log(1.1), 2 * noise):
        continue
      differ[eigen_ms < stock_ms] += 1
      assert pick_eigen == (eigen_ms < stock_ms), (name, batch, stock_ms, eigen_ms)
  assert differ[True] >= 1 and differ[False] >= 1, differ


def test_rule_is_a_threshold_on_the_op_shares_and_the_work_per_call():
  """Fresh random profiles and batches: the rule is exactly 'dense convs at least
  CONV_SHARE_MIN of the MACs, grouped convs at most GROUPED_SHARE_MAX of the conv MACs,
  at least CONV_MACS_MIN conv MACs per call' (the closed form)."""
  rng = np.random.default_rng()
  for _ in range(300):
    conv, grouped, dot = (int(v) for v in rng.integers(0, 10**8, 3) * rng.integers(0, 2, 3))
    batch = int(rng.choice([1, 8, 32, 128, 512]))
    profile = {"conv": conv, "grouped_conv": grouped, "dot": dot}
    share = grouped / (conv + grouped) if conv + grouped else 0.0
    total = conv + grouped + dot
    assert runtime.eigen_convs_faster(profile, batch) == (
        total > 0 and conv / total >= runtime.CONV_SHARE_MIN
        and share <= runtime.GROUPED_SHARE_MAX
        and conv * batch >= runtime.CONV_MACS_MIN), (profile, batch)


class _Mixed(nn.Module):
  c1: int
  c2: int
  d: int
  grouped: bool = True  # the middle conv depthwise (else dense)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.Conv(self.c1, (3, 3), strides=(2, 2), use_bias=False)(x)
    x = nn.Conv(self.c1, (3, 3), feature_group_count=self.c1 if self.grouped else 1,
                use_bias=False)(x)
    x = nn.Conv(self.c2, (1, 1))(x)
    return nn.Dense(self.d)(x.mean(axis=(1, 2)))


def test_op_profile_counts_macs_by_op_class():
  """Fresh random widths and spatial size: dense conv, depthwise conv and dense-layer
  MACs equal the closed forms (the eval forward, traced through init)."""
  rng = np.random.default_rng()
  c1, c2, d = (int(v) for v in rng.integers(2, 17, 3))
  h = int(rng.integers(2, 7)) * 2
  profile = runtime.model_profile(_Mixed(c1, c2, d), (h, h, 3))
  ho = h // 2  # SAME padding, stride 2
  assert profile == {"conv": ho * ho * c1 * 9 * 3 + ho * ho * c2 * c1,
                     "grouped_conv": ho * ho * c1 * 9, "dot": c2 * d}


def test_config_profile_gives_the_rule_for_the_configs_model():
  """The CLI's decision: a CIFAR ResNet-56 at batch 128 gets the flag, the TAS smoke's
  16x16 ResNet-20 (too little work a call) and a depthwise MobileNet (dnw_mobilenet)
  do not; a model that cannot be built is None (stock settings)."""
  config = conftest.load_config("configs/tas_resnet.py", "depth=56")
  resnet = runtime.config_profile(config)
  assert resnet["grouped_conv"] == 0 and runtime.eigen_convs_faster(resnet, 128)
  smoke = runtime.config_profile(conftest.load_config("configs/tas_resnet.py", "smoke"))
  assert smoke["conv"] == 10203136 and not runtime.eigen_convs_faster(smoke, 128)
  config = conftest.load_config("configs/dnw_mobilenet.py", "smoke")
  mobile = runtime.config_profile(config)
  assert mobile["grouped_conv"] > 0 and not runtime.eigen_convs_faster(mobile)
  config.model.name = "no_such_model"
  assert runtime.config_profile(config) is None


def test_default_round_to_picks_the_faster_multiple_on_recorded_speedups(monkeypatch):
  """On the 512-bit-vector CPU's recorded speed-ups (latency.ROUND_TO_RECORDED), the
  default round_to is the faster multiple wherever the two differ by more than 3%, for
  XLA's stock convs and for convs given to Eigen; the records include a case 16 wins
  and one 8 wins."""
  monkeypatch.setattr(latency, "wide_vectors", lambda cpuinfo=None: True)
  won = set()
  for name, rec in latency.ROUND_TO_RECORDED.items():
    for (convs, batch), speedup in rec["speedup"].items():
      flags = "" if convs == "stock" else f"--foo=1 {latency.EIGEN_CONV_FLAG}"
      monkeypatch.setenv("XLA_FLAGS", flags)
      got = latency.default_round_to("cpu", rec["profile"])
      if abs(np.log(speedup[8] / speedup[16])) <= np.log(1.03):
        continue
      best = max(speedup, key=speedup.get)
      won.add(best)
      assert got == best, (name, convs, batch, speedup, got)
  assert won == {8, 16}


def test_default_round_to_is_the_closed_form_of_its_four_conditions(monkeypatch):
  """Fresh random profiles, backends, XLA_FLAGS and cpuinfo texts: 16 exactly on a CPU
  with avx512f, stock convs and a model of dense convs; the backend's table otherwise;
  the cpuinfo and flag readers against their definitions."""
  rng = np.random.default_rng()
  words = ["fpu", "sse2", "avx", "avx2", "avx512f", "avx512bw", "avx512_vnni"]
  wide_vectors = latency.wide_vectors  # the reader itself (patched below for the rule)
  for _ in range(200):
    conv, grouped, dot = (int(v) for v in rng.integers(0, 10**8, 3) * rng.integers(0, 2, 3))
    profile = {"conv": conv, "grouped_conv": grouped, "dot": dot}
    backend = str(rng.choice(["cpu", "gpu", "tpu"]))
    flags = list(rng.choice(words, int(rng.integers(0, 6)), replace=False))
    cpuinfo = f"processor\t: 0\nflags\t\t: {' '.join(flags)}\nbogomips\t: 1\n"
    eigen = bool(rng.integers(2))
    xla_flags = "--xla_force_host_platform_device_count=8" + (
        " " + latency.EIGEN_CONV_FLAG if eigen else "")
    assert wide_vectors(cpuinfo) == ("avx512f" in flags)
    assert latency.stock_convs(xla_flags) == (not eigen)
    total = conv + grouped + dot
    dense = (total > 0 and conv >= latency.CONV_SHARE_MIN * total
             and (grouped / (conv + grouped) if conv + grouped else 0.0)
             <= latency.GROUPED_SHARE_MAX)
    assert latency.dense_convs(profile) == dense
    monkeypatch.setattr(latency, "wide_vectors", lambda c=None, v="avx512f" in flags: v)
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    want = (16 if backend == "cpu" and dense and not eigen and "avx512f" in flags
            else runtime.ROUND_TO[backend])
    assert latency.default_round_to(backend, profile) == want
    assert latency.default_round_to(backend, None) == runtime.ROUND_TO[backend]
  assert not wide_vectors("no flags line here")


def test_prune_to_and_the_recipes_pass_the_model_to_the_default(monkeypatch):
  """prune_to's round_to=None and a recipe's round_to 0 ask for the default with the
  model's op profile (a dense-conv net: 16 where the CPU conditions hold, patched on)."""
  from jaxprune import surgery  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(latency, "wide_vectors", lambda cpuinfo=None: True)
  monkeypatch.setattr(latency, "stock_convs", lambda xla_flags=None: True)
  if jax.default_backend() != "cpu":
    return
  model = _Mixed(32, 32, 3, grouped=False)
  x = jnp.zeros((1, 8, 8, 3))
  variables = model.init(jax.random.key(int(np.random.default_rng().integers(1 << 30))), x)
  _, info = surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=0.6)
  assert info["round_to"] == 16
  config = conftest.load_config("configs/tas_resnet.py", "smoke")
  assert tas.round_to_of(config) == 16
  config = conftest.load_config("configs/dnw_mobilenet.py", "smoke")  # depthwise
  config.tas = {"round_to": 0}
  assert tas.round_to_of(config) == runtime.ROUND_TO["cpu"]


def test_default_round_to_follows_the_backend():
  assert runtime.default_round_to("cpu") == 8
  assert runtime.default_round_to("some_new_backend") == 1
  assert runtime.default_round_to() == runtime.ROUND_TO[jax.default_backend()]
  config = conftest.load_config("configs/tas_resnet.py", "smoke")
  assert config.tas.round_to == 0 and tas.round_to_of(config) == runtime.default_round_to()
  config.tas.round_to = 1
  assert tas.round_to_of(config) == 1


def test_resnet_space_searches_rounded_candidates_and_derives_what_it_priced():
  """The dedicated ResNet space at round_to k searches every conv among its candidates
  rounded up to multiples of k (fitted where k leaves too few; round_to=1 is the
  reference's), samples only those, and its derived network is the argmax network the
  search priced: the exact FLOPs count of the derived network equals F_cost."""
  rng = np.random.default_rng()
  shape = (8, 8, 3)
  for k in (1, 8, int(rng.choice([2, 4, 16]))):
    net = tas.resnet_space(8, 10, 2, shape, round_to=k)
    assert net.round_to == k == net.model.round_to
    cands = net.model.conv_candidates()
    full = net.model.full_widths()
    for c, f in zip(cands, full):
      want = sorted({min(f, -(-w // k) * k) for w in search_base.width_candidates(f)})
      assert list(c) == want or len(want) < 2, (k, f, c, want)
      assert len(c) >= 2 and max(c) == f
    if k == 1:
      assert cands == [search_base.width_candidates(f) for f in full]
    params, state, arch = net.init(jax.random.key(int(rng.integers(1 << 30))))
    # Per-candidate BN rows: one per rounded candidate.
    assert params["stem"]["bn"]["scale"].shape == (len(cands[0]), full[0])
    arch = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), arch)
    selections, _ = net.model.sample(arch, 1.0, jax.random.key(int(rng.integers(1 << 30))))
    for sel, c in zip(selections, cands):
      assert set(np.asarray(sel.widths).tolist()) <= set(c)
    record = net.record(arch)
    model, derived = net.derived_from(record)
    assert derived["widths"] == record["argmax_widths"]
    assert all(w in c for w, c in zip(derived["widths"], cands))
    variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0),
                                                      jnp.zeros((1, *shape)), train=False))
    assert flops.count(model, variables, shape)["flops"] == record["argmax_flops"]
    assert abs(float(net.argmax_cost(arch)) - record["argmax_flops"]) <= (
        1e-6 * record["argmax_flops"])


def test_compare_inference_times_every_network():
  """Alternated timing returns a positive median per network (a logic check, no speed)."""
  x = jnp.zeros((1, 8, 8, 3))
  nets = {}
  for name, width in (("a", 3), ("b", 5)):
    m = _Mixed(width, width, 2)
    nets[name] = (m, m.init(jax.random.key(0), x))
  ms = report.compare_inference(nets, (8, 8, 3), batch_size=2, rounds=3)
  assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())


def test_default_round_to_never_leaves_a_narrow_group_unsearchable():
  """TAS's backend-default round_to (8 on a CPU) searches a group too narrow for it at the
  largest power-of-two fraction of it that still gives num_picks candidates; wider groups
  are rounded as asked (reference: the candidates enumerated at every multiple)."""
  from jaxprune.search import space
  rng = np.random.default_rng()
  for _ in range(40):
    width, picks = int(rng.integers(2, 80)), int(rng.integers(2, 4))
    round_to = int(rng.choice([2, 4, 8, 16]))
    got = space.fitted_candidates(width, round_to, picks)
    want = None
    for r in (round_to, round_to // 2, round_to // 4, round_to // 8, round_to // 16, 1):
      r = max(r, 1)
      cands = sorted({min(width, -(-c // r) * r) for c in search_base.width_candidates(width)})
      if len(cands) >= picks or r == 1:
        want = tuple(cands)
        break
    assert got == want, (width, round_to, picks)
    if len(space.rounded_candidates(width, round_to)) >= picks:
      assert got == space.rounded_candidates(width, round_to)
  # An 8-channel group at round_to=8: one candidate rounded, searchable fitted.
  assert len(space.rounded_candidates(8, 8)) == 1
  assert len(space.fitted_candidates(8, 8, 2)) >= 2
