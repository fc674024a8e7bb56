r"""Does a pruned network run as much faster as asked? Measured latency at batch 1 and 128.

**The zoo table** (the default): ResNet-56 (CIFAR, 32x32x3, 10 classes), MobileNetV2
(CIFAR layout: stride-1 stem, width 1.0, 1280-wide head) and a ViT-S-shaped encoder (12
pre-LN blocks, width 384, 6 heads, MLP 1536, 8x8 patches of a 32x32x3 image: 16 tokens
and a cls token), random weights (speed only). Each is pruned by
``surgery.prune_to(criterion="l1", ...)`` to

- a FLOPs target (``flops_ratio=0.5``): the rows ``flops 0.5``;
- a latency target (``latency_ratio=0.5``, its per-op table timed at the row's batch):
  the rows ``latency 0.5`` (when ``prune_to`` takes ``latency_ratio``),

with ``prune_to``'s default ``round_to`` (None: the backend's multiple for the model,
:func:`jaxprune.engine.runtime.default_round_to`, groups not wider than it whole while
the target is reachable so, else at a finer multiple; ``--round_to`` to fix one). Each model and batch runs in a process of its
own, with the XLA:CPU flag that :mod:`jaxprune.engine.runtime`'s rule picks for it at that
batch (as ``jaxprune.main`` does at the report's batch; the default round_to follows it),
and times the base and the pruned networks alternately (one call of each per round,
median over at least ``--rounds`` rounds and ``--min_timing_s`` seconds of calls): the
ratios come from one run on one machine. Columns: speed-up
(base ms / pruned ms), speed-up / FLOPs reduction, speed-up / requested speed-up
(1 / ratio); latency rows also give the table's predicted speed-up and what
``prune_to``'s calibration measured while pruning (its own alternated timing at the
row's batch, its rounds and whether it met the request). A latency target the table
cannot reach at ``round_to`` is a row with ``prune_to``'s one-line refusal; the other
rows are kept.

**The runtime rule's figures** (``--flags``): the same three unpruned models, each
program compiled three times in one process, with XLA:CPU's stock settings, with
convolutions given to Eigen (the flag of :mod:`jaxprune.engine.runtime`, set per
compile through ``compiler_options``) and with the stock settings again (a control:
how far two identical programs' medians differ on this machine), timed alternately.

**One conv by width** (``--convs``): a 3x3 conv (stride 1, padding 1) at the three
CIFAR ResNet stages' resolutions and widths (32x32 at 16 channels, 16x16 at 32, 8x8 at
64), then with its output narrowed to 1/2 (a block's inner conv), both sides to 1/2 and
1/4, and 1 channel in and out, each with XLA:CPU's stock settings and with convolutions
given to Eigen, alternated in one process: how much of a narrowing's FLOPs cut a single
conv turns into time (a conv's fixed cost per output pixel is what a pruned network
keeps; docs/results.md, *Benchmarks*).

**The ResNet-56 TAS table** (``--tas``): the shapes TAS derives (the authors' released
C010-ResNet56, rounded; L1 at 0.5 of the FLOPs with round_to 1 and 8; short graph-space
searches on the CIFAR-10 subset with the FLOPs cost, FLOPs cost + round_to=8 and latency
cost, ``--search_steps`` iterations each, default 310), timed like the zoo table.

  python benchmarks/pruned_speed.py                 # the zoo table (~25 min on 2 cores)
  python benchmarks/pruned_speed.py --quick         # 5 rounds, latency rows at batch 1 only
  python benchmarks/pruned_speed.py --flags         # the rule's figures
  python benchmarks/pruned_speed.py --tas --search_steps 0   # TAS shapes, no searches
  python benchmarks/pruned_speed.py --convs --batches 128     # one conv by width
"""
import argparse
import importlib.resources
import importlib.util
import inspect
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.engine import runtime
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order

SHAPE = (32, 32, 3)
REPO = pathlib.Path(__file__).resolve().parents[1]
ZOO = ("resnet56", "mobilenetv2", "vit_s")
# Groups left whole (prune_to's ignore=) per model: none (MobileNetV2's stem group,
# whose width decides block0's `expand != x.shape[-1]`, rebuilds since issue 24).
IGNORE = {}


class InvertedResidual(nn.Module):
  expand: int
  out: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    y = x
    if self.expand != x.shape[-1]:
      y = nn.relu6(bn("expand_bn")(nn.Conv(self.expand, (1, 1), use_bias=False,
                                           name="expand")(y)))
    c = y.shape[-1]  # depthwise: as wide as its input, whatever pruning left
    y = nn.Conv(c, (3, 3), (self.stride, self.stride), feature_group_count=c,
                use_bias=False, name="dw")(y)
    y = nn.relu6(bn("dw_bn")(y))
    y = bn("project_bn")(nn.Conv(self.out, (1, 1), use_bias=False, name="project")(y))
    return x + y if self.stride == 1 and x.shape[-1] == self.out else y


class MobileNetV2(nn.Module):
  """MobileNetV2 (width 1.0) in the CIFAR layout: stride-1 stem and first stages."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    x = nn.relu6(bn("bn_stem")(nn.Conv(32, (3, 3), use_bias=False, name="stem")(x)))
    cin, i = 32, 0
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
      for j in range(n):
        x = InvertedResidual(cin * t, c, s if j == 0 else 1, name=f"block{i}")(x, train)
        cin, i = c, i + 1
    x = nn.relu6(bn("bn_head")(nn.Conv(1280, (1, 1), use_bias=False, name="head_conv")(x)))
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class EncoderBlock(nn.Module):
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True,
                                        name="attn")(nn.LayerNorm(name="ln1")(x))
    x = x + y
    y = nn.gelu(nn.Dense(self.mlp, name="mlp1")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(x.shape[-1], name="mlp2")(y)


class ViTS(nn.Module):
  """A ViT-S-shaped encoder (width 384, 6 heads, MLP 1536, 12 blocks) on 8x8 patches."""
  num_classes: int = 10
  depth: int = 12
  width: int = 384
  heads: int = 6
  mlp: int = 1536
  patch: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    p = self.patch
    x = nn.Conv(self.width, (p, p), (p, p), padding="VALID", name="patch")(x)
    n, h, w, e = x.shape
    x = x.reshape((n, h * w, e))
    cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, e))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], e))
    for i in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp, name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])


def build(name: str):
  """The zoo model ``name`` (a Linen module called as ``apply(v, x, train=False)``)."""
  if name == "resnet56":
    from jaxprune import models  # pylint: disable=g-import-not-at-top
    return models.cifar_resnet(56, 10)
  return {"mobilenetv2": MobileNetV2, "vit_s": ViTS}[name]()


MIN_TIMING_S = 10.0  # at least this long of timed calls per table (more rounds for fast nets)
MAX_ROUNDS = 400


def alternated_ms(fns: dict, x, rounds: int, min_s: float = MIN_TIMING_S) -> dict:
  """Median ms of every ``fn(x)`` (compiled, blocking), one call of each per round;
  at least ``rounds`` rounds and about ``min_s`` seconds of calls (at most
  :data:`MAX_ROUNDS` rounds): at batch 1 ten rounds are a fraction of a second, which a
  loaded machine's noise swamps (as ``prune_to``'s calibration timer does)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  for f in fns.values():  # compiles
    jax.block_until_ready(f(x))
  t = time.perf_counter()
  for f in fns.values():  # one untimed round: how many rounds fill min_s
    jax.block_until_ready(f(x))
  once = time.perf_counter() - t
  rounds = int(min(MAX_ROUNDS, max(rounds, math.ceil(min_s / max(once, 1e-6)))))
  print(f"[timing] {rounds} alternated rounds of {', '.join(fns)} (batch {x.shape[0]}, "
        f"load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
  times = {n: [] for n in fns}
  for _ in range(rounds):
    for name, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(x))
      times[name].append(time.perf_counter() - t)
  return {n: float(np.median(t)) * 1e3 for n, t in times.items()}


def forward(model, variables, options=None):
  import jax  # pylint: disable=g-import-not-at-top
  f = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=options)
  v = jax.device_put(variables)
  return lambda x: f(v, x)


def zoo_model_rows(name: str, args) -> list:
  """The zoo table's rows of one model (run in a process of its own per batch: the XLA
  flag and the default round_to are the rule's for this model at its largest batch, as
  ``jaxprune.main`` picks them at the report's batch)."""
  model = build(name)
  profile = runtime.model_profile(model, SHAPE)
  flag = runtime.configure(profile=profile, batch=max(args.batches))  # before the backend
  import jax  # pylint: disable=g-import-not-at-top
  from jaxprune import flops, surgery  # pylint: disable=g-import-not-at-top
  from jaxprune.errors import UserError  # pylint: disable=g-import-not-at-top
  round_to = args.round_to or None  # None: prune_to's default, what a user gets
  variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)),
                                        train=False))
  base_flops = flops.count(model, variables, SHAPE)["flops"]
  latency = "latency_ratio" in inspect.signature(surgery.prune_to).parameters
  pruned, refused = {}, []
  t0 = time.perf_counter()
  ignore = IGNORE.get(name, ())
  small, info = surgery.prune_to(model, variables, SHAPE, criterion="l1",
                                 flops_ratio=args.ratio, round_to=round_to, ignore=ignore)
  pruned["flops"] = {b: small for b in args.batches}
  used, multiple = _round_to_label(info), str(info["round_to"])
  for b in [b for b in (args.latency_batches or args.batches)
            if b in args.batches] if latency else ():
    grid = {"latency_grid": args.latency_grid} if args.latency_grid else {}
    try:
      if args.depth:
        grid["depth"] = True
      small, info = surgery.prune_to(model, variables, SHAPE, criterion="l1",
                                     latency_ratio=args.ratio, batch_size=b,
                                     round_to=round_to, ignore=ignore, **grid)
    except UserError as e:  # a target the table cannot reach: a row that says so
      refused.append({"model": name, "target": _latency_target(args), "batch": b,
                      "round_to": multiple, "flag": bool(flag),
                      "refused": str(e)})
      continue
    pruned.setdefault("latency", {})[b] = (small, _latency_info(info))
  print(f"[{name}] pruned in {time.perf_counter() - t0:.0f} s (XLA:CPU conv flag "
        f"{'on' if flag else 'off'}, grouped conv share {runtime.grouped_share(profile):.3f}, "
        f"round_to {used})", file=sys.stderr, flush=True)
  rows = []
  for b in args.batches:
    x = jax.random.normal(jax.random.key(1), (b, *SHAPE))
    nets = {"base": forward(model, variables)}
    for target, per_batch in pruned.items():
      if b in per_batch:
        small = per_batch[b][0] if target == "latency" else per_batch[b]
        nets[target] = forward(small.model, small.variables)
    ms = alternated_ms(nets, x, args.rounds, args.min_timing_s)
    for target, per_batch in pruned.items():
      if b not in per_batch:
        continue
      small = per_batch[b][0] if target == "latency" else per_batch[b]
      f = flops.count(small.model, small.variables, SHAPE)["flops"]
      label = _latency_target(args) if target == "latency" else f"{target} {args.ratio:g}"
      row = {"model": name, "target": label, "batch": b,
             "round_to": used, "flag": bool(flag), "base_ms": ms["base"],
             "pruned_ms": ms[target], "flops_reduction": base_flops / f,
             "base_mflops": base_flops / 1e6, "pruned_mflops": f / 1e6}
      if target == "latency":
        row.update(per_batch[b][1])
      rows.append(row)
  return rows + refused


def _round_to_label(info) -> str:
  """The multiple ``prune_to`` used, and what it did with groups not wider than it."""
  label = str(info["round_to"])
  if info.get("narrow_whole"):
    label += f", {len(info['narrow_whole'])} narrow groups whole"
  if info.get("fitted_round_to"):
    label += ", narrow groups at " + "/".join(
        str(r) for r in sorted(set(info["fitted_round_to"].values())))
  return label


def _latency_target(args) -> str:
  return f"latency {args.ratio:g}" + (" + blocks" if args.depth else "")


def _latency_info(info) -> dict:
  """What a latency row records of ``prune_to``'s info: the table's prediction and, when
  calibrated (the default), the calibration's own measured speed-up (at the row's batch,
  timed while pruning) and its rounds."""
  out = {"predicted_speedup": float(info["predicted_speedup"]),
         "round_to": _round_to_label(info)}
  if "removed_blocks" in info:
    out["removed_blocks"] = len(info["removed_blocks"])
  if "calibration" in info:
    out.update(measured_speedup=float(info["measured_speedup"]),
               calibration_rounds=int(info["calibration"]["rounds"]),
               calibration_met=bool(info["calibration"]["met"]))
  return out


def zoo(args, argv):
  rows = []
  for name in args.models:
    for batch in args.batches:  # the flag and round_to follow the batch (the rule's)
      cmd = [sys.executable, __file__, *argv, "--model", name, "--batches", str(batch)]
      run = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
      if run.returncode:
        print(f"[{name}, batch {batch}] failed (exit {run.returncode}); its rows are "
              "missing", flush=True)
        continue
      rows += json.loads(run.stdout.strip().splitlines()[-1])
      print(f"[{name}, batch {batch}] rows: {run.stdout.strip().splitlines()[-1]}",
            flush=True)
  print()
  print("| model | target | batch | XLA:CPU conv flag | round_to | MFLOPs base -> pruned | base ms | "
        "pruned ms | speed-up | FLOPs reduction | speed-up / FLOPs reduction | "
        "speed-up / requested | table's predicted speed-up | calibration: measured speed-up "
        "(rounds, met) |")
  print("|---" * 14 + "|")
  for r in rows:
    if "refused" in r:
      print(f"| {r['model']} | {r['target']} | {r['batch']} | {'on' if r['flag'] else 'off'} | "
            f"{r['round_to']} | refused: {r['refused']} |" + " |" * 8, flush=True)
      continue
    s = r["base_ms"] / r["pruned_ms"]
    pred = f"{r['predicted_speedup']:.2f}x" if "predicted_speedup" in r else ""
    if "removed_blocks" in r:
      pred += f" ({r['removed_blocks']} blocks removed)"
    cal = (f"{r['measured_speedup']:.2f}x ({r['calibration_rounds']}, "
           f"{'met' if r['calibration_met'] else 'not met'})" if "measured_speedup" in r else "")
    print(f"| {r['model']} | {r['target']} | {r['batch']} | {'on' if r['flag'] else 'off'} | "
          f"{r['round_to']} | {r['base_mflops']:.1f} -> {r['pruned_mflops']:.1f} | {r['base_ms']:.2f} | "
          f"{r['pruned_ms']:.2f} | {s:.2f}x | {r['flops_reduction']:.2f}x | "
          f"{s / r['flops_reduction']:.2f} | {s * args.ratio:.2f} | {pred} | {cal} |", flush=True)


def flag_figures(args):
  """Both conv settings per model and batch, alternated in one process (--flags)."""
  runtime.configure_malloc()  # no process flag: each program picks its own settings
  import jax  # pylint: disable=g-import-not-at-top
  print("\n| model | MMACs | conv / grouped conv / dot share | batch | stock ms | "
        "convs to Eigen ms | stock / Eigen | stock / stock again (noise) | rule picks |")
  print("|---" * 9 + "|")
  for name in args.models:
    model = build(name)
    profile = runtime.model_profile(model, SHAPE)
    total = sum(profile.values())
    variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)),
                                          train=False))
    for b in args.batches:
      x = jax.random.normal(jax.random.key(1), (b, *SHAPE))
      ms = alternated_ms({"stock": forward(model, variables),
                          "eigen": forward(model, variables, runtime.EIGEN_CONV_OPTIONS),
                          "control": forward(model, variables)},  # stock again: the noise
                         x, args.rounds)
      shares = " / ".join(f"{profile[k] / total:.3f}" for k in ("conv", "grouped_conv", "dot"))
      pick = "Eigen" if runtime.eigen_convs_faster(profile) else "stock"
      print(f"| {name} | {total / 1e6:.1f} | {shares} | {b} | {ms['stock']:.2f} | "
            f"{ms['eigen']:.2f} | {ms['stock'] / ms['eigen']:.2f} | "
            f"{ms['stock'] / ms['control']:.2f} | {pick} |", flush=True)


CONV_STAGES = ((32, 16), (16, 32), (8, 64))  # (resolution, width) of the CIFAR ResNet stages


def conv_figures(args):
  """A 3x3 conv at each stage's resolution, full and narrowed widths, both conv
  settings, alternated in one process (--convs; main set the allocator, no process flag:
  each program picks its own conv settings)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  print("\n| batch | resolution | in -> out | MMACs | stock ms | Eigen ms | stock "
        "GMAC/s | FLOPs / full | stock ms / full's |")
  print("|---" * 9 + "|")
  for b in args.batches:
    for hw, width in CONV_STAGES:
      cases = ((width, width), (width, width // 2), (width // 2, width // 2),
               (width // 4, width // 4), (1, 1))
      fns = {}
      for cin, cout in cases:
        x = jax.random.normal(jax.random.key(0), (b, hw, hw, cin))
        w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
        for setting, options in (("stock", None), ("eigen", runtime.EIGEN_CONV_OPTIONS)):
          f = jax.jit(conv, compiler_options=options)
          fns[f"{cin}->{cout} {setting}"] = lambda _, f=f, x=x, w=w: f(x, w)
      ms = alternated_ms(fns, jnp.zeros((b,)), args.rounds)
      full = ms[f"{width}->{width} stock"]
      for cin, cout in cases:
        macs = b * hw * hw * 9 * cin * cout
        stock, eigen = ms[f"{cin}->{cout} stock"], ms[f"{cin}->{cout} eigen"]
        print(f"| {b} | {hw}x{hw} | {cin} -> {cout} | {macs / 1e6:.1f} | {stock:.3f} | "
              f"{eigen:.3f} | {macs / stock / 1e6:.1f} | {cin * cout / width**2:.3f} | "
              f"{stock / full:.2f} |", flush=True)


TAS_SEARCHES = {"tas graph flops": dict(cost="flops", round_to=1),
                "tas graph flops round_to=8": dict(cost="flops", round_to=8),
                "tas graph latency": dict(cost="latency", round_to=1)}


def _round_up(widths, k):
  return [int(-(-w // k) * k) for w in widths]


def searched(name, workdir: str, steps: int, batch: int, cost: str, round_to: int):
  """``(derived model, history record, net)`` of a short TAS search of a ResNet-56 (the
  graph space) at target ratio 0.5 (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxprune import data  # pylint: disable=g-import-not-at-top
  from jaxprune.engine import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from jaxprune.methods import tas  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("tas_cfg", REPO / "configs/tas_resnet.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("depth=56,dataset=cifar10_subset,ratio=0.5")
  config.tas.update(space="graph", cost=cost, round_to=round_to, batch_size=batch,
                    max_steps=steps, derive_epoch="best", log_every_steps=50,
                    checkpoint_every_steps=steps)
  datasets = data.load(config.dataset)
  steps_per_epoch = len(datasets["train"].labels) // 2 // batch
  config.tas.epochs = max(1, math.ceil(steps / steps_per_epoch))  # tau spans the steps
  tas.validate(config)
  print(f"[{name}] search: {steps} steps at batch {batch}, cost={cost}, round_to={round_to}",
        flush=True)
  found, history = tas.search(config, os.path.join(workdir, name.replace(" ", "_")),
                              datasets, mesh_lib.make_mesh(jax.devices()[:1]))
  chosen = tas.choose_epoch(history, "best")
  model, _ = found["space"].derived_from(chosen)
  return model, chosen, found["space"]


def tas_networks(searches=None):
  """``{name: (model, variables)}`` of the TAS table (random weights: speed only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxprune import models, surgery  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, *SHAPE))
  init = lambda m, seed=0: jax.device_get(m.init(jax.random.key(seed), x, train=False))
  base = models.cifar_resnet(56, 10)
  out = {"base": (base, init(base))}
  text = importlib.resources.files("jaxprune").joinpath(
      "resources/tas_released_shapes.json").read_text(encoding="utf-8")
  shape = json.loads(text)["C010-ResNet56"]
  released = models.cifar_resnet_from_shape(shape["xchannels"], shape["xblocks"], 10)
  out["tas"] = (released, init(released))
  rounded = models.cifar_resnet_from_shape(
      [shape["xchannels"][0]] + _round_up(shape["xchannels"][1:], 8), shape["xblocks"], 10)
  out["tas round_to=8"] = (rounded, init(rounded))
  for k in (8, 1):
    small, _ = surgery.prune_to(base, out["base"][1], SHAPE, criterion="l1",
                                flops_ratio=0.5, round_to=k)
    out[f"l1 round_to={k}"] = (small.model, jax.device_get(small.variables))
  for name, model in (searches or {}).items():
    out[name] = (model, init(model))
  return out


def tas_table(args):
  """The ResNet-56 TAS table (--tas)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxprune import flops  # pylint: disable=g-import-not-at-top
  workdir = args.workdir or tempfile.mkdtemp(prefix="pruned_speed_")
  found = {}
  if args.search_steps:
    for name, kw in TAS_SEARCHES.items():
      found[name] = searched(name, workdir, args.search_steps, args.search_batch, **kw)
  nets = tas_networks({name: model for name, (model, _, _) in found.items()})
  counts = {n: flops.count(m, v, SHAPE)["flops"] for n, (m, v) in nets.items()}
  ms = {}
  for b in args.batches:
    x = jax.random.normal(jax.random.key(1), (b, *SHAPE))
    for name, t in alternated_ms({n: forward(m, v) for n, (m, v) in nets.items()}, x,
                                 args.rounds).items():
      ms[(name, b)] = t
  print()
  head = " | ".join(f"ms (batch {b}) | speed-up (batch {b})" for b in args.batches)
  print(f"| network | MFLOPs | FLOPs reduction | {head} | speed-up / FLOPs reduction |")
  print("|---" * (4 + 2 * len(args.batches)) + "|")
  for name in nets:
    reduction = counts["base"] / counts[name]
    cells = [f"{ms[(name, b)]:.2f} | {ms[('base', b)] / ms[(name, b)]:.2f}x"
             for b in args.batches]
    ratio = " / ".join(f"{ms[('base', b)] / ms[(name, b)] / reduction:.2f}"
                       for b in args.batches)
    print(f"| {name} | {counts[name] / 1e6:.2f} | {reduction:.2f}x | " + " | ".join(cells)
          + f" | {ratio} |", flush=True)
  print()
  for name, (_, record, _) in found.items():
    line = (f"{name}: search epoch {record['epoch']}, argmax FLOPs "
            f"{record['argmax_flops'] / 1e6:.2f}M (target {record['target_flops'] / 1e6:.2f}M), "
            f"blocks per stage {record['argmax_blocks']}")
    if "latency_batch" in record:
      line += (f"; latency table (batch {record['latency_batch']}): full "
               f"{record['latency_max_ms']:.1f} ms, derived {record['argmax_latency_ms']:.1f} ms"
               f" (target {record['target_latency_ms']:.1f}), predicted speed-up "
               f"{record['latency_max_ms'] / record['argmax_latency_ms']:.2f}x")
    print(line, flush=True)
  if found:
    print(f"searches: {workdir}")


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--flags", action="store_true", help="the runtime rule's figures")
  mode.add_argument("--tas", action="store_true", help="the ResNet-56 TAS table")
  mode.add_argument("--convs", action="store_true", help="one conv by width")
  mode.add_argument("--model", choices=ZOO, help=argparse.SUPPRESS)  # one model's rows
  parser.add_argument("--quick", action="store_true",
                      help="5 rounds; latency rows at batch 1 only, a coarser table grid")
  parser.add_argument("--models", nargs="+", choices=ZOO, default=list(ZOO))
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  parser.add_argument("--latency_batches", type=int, nargs="+", default=None,
                      help="batches with latency rows (default: --batches)")
  parser.add_argument("--latency_grid", type=int, default=None,
                      help="latency candidates per group (default: prune_to's)")
  parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 20)")
  parser.add_argument("--min_timing_s", type=float, default=MIN_TIMING_S,
                      help="zoo table: at least this many seconds of timed calls per "
                      "model and batch (more rounds for fast networks)")
  parser.add_argument("--ratio", type=float, default=0.5, help="the FLOPs / latency target")
  parser.add_argument("--depth", action="store_true",
                      help="latency rows also remove residual blocks (prune_to depth=True)")
  parser.add_argument("--round_to", type=int, default=0,
                      help="0: runtime.default_round_to() of the backend for the model")
  parser.add_argument("--search_steps", type=int, default=310,
                      help="--tas: iterations of each TAS search (0: no searched rows)")
  parser.add_argument("--search_batch", type=int, default=32)
  parser.add_argument("--workdir", default="",
                      help="--tas: where the searches run (default: a new temporary folder)")
  args = parser.parse_args(argv)
  if args.rounds is None:
    args.rounds = 5 if args.quick else 20
  if args.quick:
    args.latency_batches = args.latency_batches or [1]
    args.latency_grid = args.latency_grid or 4
  if args.model:
    print(json.dumps(zoo_model_rows(args.model, args)))
    return
  if args.flags or args.convs:
    runtime.configure_malloc()
  elif args.tas:
    runtime.configure(profile=runtime.model_profile(build("resnet56"), SHAPE))
  timing.print_header([sys.argv[0], *argv])
  if args.flags:
    flag_figures(args)
  elif args.convs:
    conv_figures(args)
  elif args.tas:
    tas_table(args)
  else:
    zoo(args, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
