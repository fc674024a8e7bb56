"""Hardware cost and timing: per-op latency tables (planned from a graph and candidate
widths, timed once, cached by fingerprint), the inference timers, the default ``round_to``.
Knows no configs, workdirs or processes."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import jsonio
from jaxprune.errors import UserError

FORMAT = "jaxprune.latency_table/1"
_MIN_SAMPLE_S = 2e-3  # calls per timing sample: enough to last this long (batch 1 ops)
_MAX_CALLS = 64


# Kept widths a multiple of this by default (``round_to`` of TAS and ``prune_to``), per
# backend. CPU, measured (2-core x86-64, XLA:CPU, batch 128, alternated): the TAS smoke's
# derived ResNet-20 (16x16 inputs) ran 1.18x faster than its base at 2.29x fewer FLOPs
# with its searched widths, 1.69x at 1.94x with the widths rounded to multiples of 8 (to
# 4: 1.33x at 2.26x); L1-pruned ResNet-56s and ResNet-50s alike (docs/results.md). GPU and
# TPU: 8, not measured here (tensor-core and MXU tiles favour multiples of 8 or more).
ROUND_TO = {"cpu": 8, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 8}

# XLA:CPU gives convolutions to YNNPACK by default; this flag gives them to Eigen
# (jaxprune.engine.runtime sets it where its rule says so).
EIGEN_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# A model "of dense convs": they do at least CONV_SHARE_MIN of its MACs, and grouped
# (depthwise) convs at most GROUPED_SHARE_MAX of the conv MACs (the runtime rule's terms).
GROUPED_SHARE_MAX = 0.01
CONV_SHARE_MIN = 0.5
# On a CPU with 512-bit vectors (AVX-512: 16 float32 lanes), YNNPACK's dense convs take
# as long for 8 output channels as for 16 (3x3, 16x16x16 input, batch 128: 1.59 vs 1.57
# ms; 8 -> 16 channels 0.98 ms), so a model of dense convs under XLA's stock settings
# defaults to multiples of 16. Measured (2026-12-06, this 2-core AVX-512 CPU, L1
# ``prune_to(flops_ratio=0.5)`` of a ResNet-56 at 32x32, base and pruned alternated,
# speed-up local / global): stock convs, batch 128: round_to 16 1.61x / 1.59x, 8 1.49x /
# 1.48x; batch 1: 16 1.57x / 1.57x, 8 1.31x / 1.34x; convs to Eigen (batch 128): 16 1.39x /
# 1.41x, 8 1.59x / 1.62x (so 8 stays there). A MobileNetV2 (depthwise) ran 1.53x at 8,
# 1.49x at 16; a ViT-S-shaped encoder 1.82x at both (both stay at 8).
WIDE_VECTOR_ROUND_TO = 16
# Those figures: speed-ups of the L1 ``prune_to(flops_ratio=0.5)`` network at each
# round_to, per (XLA:CPU convs, batch), on the 512-bit-vector CPU; local ranking, the
# models of ``benchmarks/pruned_speed.py`` (the MobileNetV2 with its stem group whole,
# whose width decides the user's block0 structure), the ``RECORDED`` op profiles.
ROUND_TO_RECORDED = {
    "resnet56": {"profile": {"conv": 125747200, "grouped_conv": 0, "dot": 640},
                 "speedup": {("stock", 128): {8: 1.49, 16: 1.61},
                             ("stock", 1): {8: 1.31, 16: 1.58},
                             ("eigen", 128): {8: 1.59, 16: 1.39}}},
    "mobilenetv2": {"profile": {"conv": 82083840, "grouped_conv": 5879808, "dot": 12800},
                    "speedup": {("stock", 128): {8: 1.53, 16: 1.49}}},
    "vit_s": {"profile": {"conv": 1179648, "grouped_conv": 0, "dot": 363639552},
              "speedup": {("stock", 128): {8: 1.82, 16: 1.81}}},
}


def default_round_to(backend: str | None = None, profile: Mapping | None = None) -> int:
  """The default ``round_to`` on ``backend`` (default: JAX's default backend, which this
  starts) for a model with ``profile`` (its :func:`op_profile`; None: not known):
  :data:`ROUND_TO`, 1 for a backend not listed; on a CPU with 512-bit vectors
  (:func:`wide_vectors`), under XLA's stock convolutions (:func:`stock_convs`), for a
  model of dense convs (:func:`dense_convs`), :data:`WIDE_VECTOR_ROUND_TO`."""
  if backend is None:
    backend = jax.default_backend()
  if (backend == "cpu" and profile is not None and dense_convs(profile)
      and stock_convs() and wide_vectors()):
    return WIDE_VECTOR_ROUND_TO
  return ROUND_TO.get(backend, 1)


def stock_convs(xla_flags: str | None = None) -> bool:
  """Whether XLA:CPU keeps its stock convolutions: :data:`EIGEN_CONV_FLAG` is not in
  ``xla_flags`` (default: the ``XLA_FLAGS`` environment variable)."""
  if xla_flags is None:
    xla_flags = os.environ.get("XLA_FLAGS", "")
  return EIGEN_CONV_FLAG.split("=")[0] not in xla_flags


def wide_vectors(cpuinfo: str | None = None) -> bool:
  """Whether this CPU has 512-bit float vectors: ``avx512f`` among the flags of
  ``cpuinfo`` (default: ``/proc/cpuinfo``; False where it cannot be read)."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpuinfo = f.read()
    except OSError:
      return False
  for line in cpuinfo.splitlines():
    if line.startswith("flags") and ":" in line:
      return "avx512f" in line.split(":", 1)[1].split()
  return False


def dense_convs(profile: Mapping) -> bool:
  """Whether a model with this :func:`op_profile` is one of dense convs: they do at
  least :data:`CONV_SHARE_MIN` of its MACs and grouped convs at most
  :data:`GROUPED_SHARE_MAX` of the conv MACs."""
  convs = profile["conv"] + profile["grouped_conv"]
  total = convs + profile["dot"]
  return (total > 0 and profile["conv"] >= CONV_SHARE_MIN * total
          and grouped_share(profile) <= GROUPED_SHARE_MAX)


def grouped_share(profile: Mapping) -> float:
  """The grouped convs' share of the conv MACs (0 without convs)."""
  convs = profile["conv"] + profile["grouped_conv"]
  return profile["grouped_conv"] / convs if convs else 0.0


def _profile_jaxpr(jaxpr, out: dict, times: int = 1):
  from jaxprune.graph import interpret  # pylint: disable=g-import-not-at-top
  for eqn, times in interpret.all_eqns(jaxpr, times):  # nested jaxprs, scans' lengths
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      per_out = math.prod(rhs) // max(rhs[dn.rhs_spec[0]], 1)  # MACs per output element
      macs = math.prod(eqn.outvars[0].aval.shape) * per_out * times
      grouped = (eqn.params.get("feature_group_count", 1) > 1
                 or eqn.params.get("batch_group_count", 1) > 1)
      out["grouped_conv" if grouped else "conv"] += macs
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out["dot"] += (math.prod(eqn.outvars[0].aval.shape)
                     * math.prod(lhs[d] for d in lhs_contract) * times)
  return out


def jaxpr_profile(jaxpr) -> dict:
  """Multiply-accumulates of a jaxpr by op class: ``{"conv", "grouped_conv", "dot"}``
  (grouped: ``feature_group_count`` or ``batch_group_count`` > 1, e.g. depthwise)."""
  return _profile_jaxpr(jaxpr, {"conv": 0, "grouped_conv": 0, "dot": 0})


def op_profile(fn, *args) -> dict:
  """:func:`jaxpr_profile` of ``fn(*args)``, traced to a jaxpr (``args`` may be
  ``jax.ShapeDtypeStruct``), which starts no backend."""
  return jaxpr_profile(jax.make_jaxpr(fn)(*args).jaxpr)


def measure_inference(model, variables, input_shape, batch_size: int = 128,
                      repeats: int = 10) -> dict:
  """Median wall time of a jitted eval-mode forward pass on one device.

  Returns ``{"batch_size", "ms_per_batch", "images_per_s"}``; compile time excluded.
  """
  device = jax.local_devices()[0]
  # A local copy: the run's variables may be replicated over every process's devices.
  variables = jax.device_put(jax.device_get(variables), device)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (batch_size, *input_shape),
                                       jnp.float32), device)
  _first_call(functools.partial(forward, variables), x, batch_size)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(forward(variables, x))
    times.append(time.perf_counter() - t)
  ms = float(np.median(times)) * 1e3
  return {"batch_size": batch_size, "ms_per_batch": ms,
          "images_per_s": batch_size / ms * 1e3, "device": device.device_kind}


def compare_inference(nets: Mapping[str, tuple[Any, Any]], input_shape,
                      batch_size: int = 128, rounds: int = 20) -> dict[str, float]:
  """Median ms per batch of every network's jitted eval-mode forward, timed alternately.

  ``nets`` maps a name to ``(model, variables)``. Each round calls every network once,
  in turn, on the same input, so the machine's drift (other jobs, clock changes) hits
  all of them alike and their ratios (a speed-up) come from the same moments; the
  median over ``rounds`` rounds is kept, compile time excluded.
  """
  device = jax.local_devices()[0]
  x = jax.device_put(jax.random.normal(jax.random.key(0), (batch_size, *input_shape),
                                       jnp.float32), device)
  calls = {}
  for name, (model, variables) in nets.items():
    forward = jax.jit(lambda v, x_, m=model: m.apply(v, x_, train=False))
    local = jax.device_put(jax.device_get(variables), device)
    calls[name] = functools.partial(forward, local)
    _first_call(calls[name], x, batch_size)
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(call(x))
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def _first_call(call, x, batch_size: int):
  """Compiles and runs ``call(x)`` once; running out of device memory is one line."""
  try:
    jax.block_until_ready(call(x))
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    raise OutOfMemory(batch_size) from None


class OutOfMemory(UserError):
  """A timed forward pass that does not fit in device memory at its ``batch_size``."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    super().__init__(f"The inference benchmark at batch {batch_size} ran out of device "
                     "memory: time a smaller batch.")


@dataclasses.dataclass(frozen=True)
class Program:
  """One distinct timed computation: a conv (NHWC x HWIO) or a dense ``x @ w``."""
  kind: str                     # "conv" or "dense"
  x_shape: tuple
  w_shape: tuple
  strides: tuple = ()
  padding: tuple = ()           # ((lo, hi), ...) per spatial axis
  groups: int = 1

  def key(self) -> list:
    return [self.kind, list(self.x_shape), list(self.w_shape), list(self.strides),
            [list(p) for p in self.padding], self.groups]

  def function(self) -> Callable:
    if self.kind == "dense":
      return lambda x, w: x @ w
    n = len(self.strides)
    spatial = "HWD"[:n] if n <= 3 else None
    if spatial is None:
      raise UserError(f"latency table: a conv with {n} spatial axes is not supported.")
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return lambda x, w: jax.lax.conv_general_dilated(
        x, w, self.strides, self.padding, dimension_numbers=dn,
        feature_group_count=self.groups)


@dataclasses.dataclass
class Candidates:
  """Candidate widths per channel group of a graph: what a table is planned for.

  Attributes:
    graph: a :class:`jaxprune.graph.Graph`.
    groups: the groups whose widths vary (others stay whole).
    candidates: each group's candidate widths, ascending, the last its full width.
    names: a unique name per group (the table's JSON and fingerprint use them).
  """
  graph: Any
  groups: list
  candidates: list
  names: list

  @classmethod
  def of(cls, graph, candidates: Mapping[int, Sequence[int]]) -> "Candidates":
    """``candidates``: ``{group id: candidate widths}``; names from the groups'
    first producers (``"conv1#3"``)."""
    groups = [graph.groups[int(gid)] for gid in candidates]
    cands = [tuple(sorted({int(c) for c in candidates[g.id]})) for g in groups]
    for g, c in zip(groups, cands):
      if not c or c[0] < 1 or c[-1] != g.width:
        raise UserError(f"latency table: group {g.id}'s candidate widths {list(c)} must be "
                        f">= 1 and end at its width {g.width}.")
    names = [f"{(g.producers or [m.path for m in g.members])[0].rsplit('/', 1)[0]}#{g.id}"
             for g in groups]
    return cls(graph, groups, cands, names)


def as_candidates(space) -> Candidates:
  """A :class:`Candidates` as is, or a :class:`SearchSpace`'s searched groups."""
  if isinstance(space, Candidates):
    return space
  return Candidates(space.graph, list(space.groups), [tuple(c) for c in space.candidates],
                    list(space.names))


@dataclasses.dataclass
class Factor:
  """The kept fraction of one channel axis (an op's FLOPs factor), linear in the picks:
  ``const + sum_s terms_s[candidate of group s]``, candidates kept as prefixes."""
  const: float  # kept fraction of the ids outside every group of the table
  terms: list   # [(group index, [n_candidates] fraction of the ids kept)]


def channel_factor(graph, groups, candidates) -> Callable[[Any], Factor]:
  """The :class:`Factor` of a channel axis (its ids) when each of `groups` keeps a
  prefix of its channels, one of its `candidates`: the one rule for the FLOPs cost of
  TAS (tas.md §5) and the latency table."""
  comp_to = {}
  for s, g in enumerate(groups):
    for c, comp in enumerate(g.channels):
      comp_to[int(comp)] = (s, c)
  comps = graph.components

  def factor(ids):
    ids = np.asarray(ids)
    n = ids.size
    const, counts = 0, {}
    for comp in comps[ids]:
      hit = comp_to.get(int(comp))
      if hit is None:
        const += 1
      else:
        counts.setdefault(hit[0], []).append(hit[1])
    terms = [(s, np.asarray([np.sum(np.asarray(ch) < c) / n for c in candidates[s]],
                            np.float32)) for s, ch in counts.items()]
    return Factor(const / n if n else 1.0, terms)
  return factor


def factors(cands: Candidates) -> list[list[Factor]]:
  """Per op of ``cands.graph.ops``: a :class:`Factor` per FLOPs factor (the same
  kept fractions the TAS FLOPs cost uses, tas.md §5)."""
  factor = channel_factor(cands.graph, cands.groups, cands.candidates)
  return [[factor(f) for f in op.factors] for op in cands.graph.ops]


@dataclasses.dataclass
class Entry:
  """One op of the graph in the table.

  ``ms[i, j]`` is the op's time at candidate ``i`` of ``in_group`` and ``j`` of
  ``out_group`` (a length-1 axis where no searched group sets that side);
  ``scaled`` are the :class:`Factor` s whose kept fraction multiplies the entry
  (the approximations of the module docstring).
  """
  op: int                       # index into graph.ops
  name: str
  in_group: int | None
  out_group: int | None
  programs: np.ndarray          # [n_in, n_out] indices into LatencyTable.programs
  scaled: list = dataclasses.field(default_factory=list)
  ms: np.ndarray | None = None  # [n_in, n_out], filled from the program times


class LatencyTable:
  """Per-op latency of candidate widths per group (see the module docstring).

  Attributes:
    batch_size: the batch the ops were timed at.
    entries: one :class:`Entry` per conv/dense op, in graph order.
    programs: the distinct :class:`Program` s.
    program_ms: each program's median time in ms (NaN until measured).
    fingerprint: what the times are valid for (a dict; see :func:`fingerprint`).
    source: "measured", "cache" (read from a file) or "unmeasured".
  """

  def __init__(self, space, batch_size: int, entries, programs, program_ms=None,
               source: str = "unmeasured"):
    space = as_candidates(space)
    self.batch_size = int(batch_size)
    self.group_ids = [g.id for g in space.groups]
    self.entries = entries
    self.programs = programs
    self.names = list(space.names)
    self.candidates = [tuple(c) for c in space.candidates]
    self.num_ops = len(space.graph.ops)
    self.fingerprint = fingerprint(space, batch_size, programs, entries)
    self.source = source
    self.set_program_ms(np.full(len(programs), np.nan) if program_ms is None
                        else program_ms)

  def set_program_ms(self, program_ms):
    """Fills every entry from the programs' times (e.g. broadcast from process 0)."""
    program_ms = np.asarray(program_ms, np.float64)
    if program_ms.shape != (len(self.programs),):
      raise ValueError(f"{program_ms.shape} program times for {len(self.programs)} "
                       "programs.")
    self.program_ms = program_ms
    for e in self.entries:
      e.ms = program_ms[e.programs].astype(np.float32)

  @property
  def full(self) -> float:
    """Latency (ms) of every op at full width: the cost loss's max."""
    return float(sum(e.ms[-1, -1] for e in self.entries))

  def index(self, widths: Mapping[int, int]) -> list[int]:
    """Candidate index per group of the table for ``{group id: width}`` (a group not
    named is whole); a width that is not a candidate is a :class:`UserError`."""
    out = []
    for gid, cands in zip(self.group_ids, self.candidates):
      w = int(widths.get(gid, cands[-1]))
      if w not in cands:
        raise UserError(f"latency table: group {gid} at width {w} is not timed (its "
                        f"candidates: {list(cands)}).")
      out.append(cands.index(w))
    return out

  def at(self, picks: Sequence[int], skip=frozenset()) -> float:
    """Latency (ms) at candidate ``picks[s]`` of every group (:meth:`index`): the
    entries at those widths, each times its scaled factors' kept fractions, summed
    (less the ops in ``skip``, indices into the graph's ops: removed blocks')."""
    return float(sum(self.entry_ms(e, picks) for e in self.entries if e.op not in skip))

  def entry_ms(self, e: Entry, picks: Sequence[int]) -> float:
    """One entry's latency at ``picks`` (see :meth:`at`)."""
    i = 0 if e.in_group is None else picks[e.in_group]
    j = 0 if e.out_group is None else picks[e.out_group]
    if e.in_group is not None and e.in_group == e.out_group:
      value = float(e.ms[i, i])
    else:
      value = float(e.ms[i, j])
    for f in e.scaled:
      value *= f.const + sum(float(m[picks[s]]) for s, m in f.terms)
    return value

  def _check(self, space):
    if list(space.names) != self.names or [tuple(c) for c in space.candidates] != \
        self.candidates:
      raise ValueError("this latency table was built for another search space "
                       "(different groups or candidate widths).")

  def _cost(self, dists, reach) -> jax.Array:
    if reach is not None and len(reach) != self.num_ops:
      raise ValueError(f"reach has {len(reach)} entries; the graph has {self.num_ops} "
                       "ops.")
    one = jnp.ones((1,), jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for e in self.entries:
      t = jnp.asarray(e.ms)
      if e.in_group is not None and e.in_group == e.out_group:
        value = dists[e.in_group] @ jnp.diagonal(t)  # one width sets both sides
      else:
        p_in = one if e.in_group is None else dists[e.in_group]
        p_out = one if e.out_group is None else dists[e.out_group]
        value = p_in @ t @ p_out
      for f in e.scaled:
        value = value * _kept_fraction(f, dists)
      if reach is not None:
        value = value * reach[e.op]
      total = total + value
    return total

  def expected(self, space, arch: Mapping[str, Any], reach=None) -> jax.Array:
    """Expected latency in ms under ``softmax(width logits)`` (module docstring).

    Args:
      space: the :class:`SearchSpace` the table was built for.
      arch: its ``arch`` tree.
      reach: optional per-op multipliers, one per op of ``space.graph.ops``: the
        probability that the sampled depth reaches the op's block. Default: the
        space's own, from ``softmax(depth logits)`` (all ones without depth search).
        May be traced.

    Returns:
      A float32 scalar; differentiable in the width (and depth) logits, jit-safe.
    """
    self._check(space)
    soft = lambda a: jax.nn.softmax(jnp.asarray(a, jnp.float32))
    if reach is None:
      reach = space_reach(space, [soft(b) for b in space.depth_logits(arch)])
    return self._cost([soft(a) for a in space.width_logits(arch)], reach)

  def argmax(self, space, arch: Mapping[str, Any], reach=None) -> jax.Array:
    """Latency in ms of the argmax network: the table's entries at the argmax widths,
    summed over the ops the argmax depths keep (``reach`` overrides, as in
    :meth:`expected`)."""
    self._check(space)
    hot = lambda a: jax.nn.one_hot(jnp.argmax(a), a.shape[-1], dtype=jnp.float32)
    if reach is None:
      reach = space_reach(space, [hot(b) for b in space.depth_logits(arch)])
    return self._cost([hot(a) for a in space.width_logits(arch)], reach)

  def to_json(self) -> dict:
    return {"format": FORMAT, "fingerprint": self.fingerprint,
            "fingerprint_sha256": _digest(self.fingerprint),
            "batch_size": self.batch_size, "full_ms": self.full,
            "program_ms": [float(v) for v in self.program_ms],
            "ops": [{"op": e.op, "name": e.name,
                     "in_group": None if e.in_group is None else self.names[e.in_group],
                     "out_group": None if e.out_group is None else self.names[e.out_group],
                     "scaled_factors": len(e.scaled), "ms": e.ms.tolist()}
                    for e in self.entries]}

  def save(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    jsonio.write_json(path, self.to_json())


def space_reach(space, depth_dists) -> list | None:
  """Per op of ``space.graph.ops``: the probability that a depth drawn from
  ``depth_dists`` (one distribution per searched stage) reaches the op's block, the
  reverse cumulative sum at its position (tas.md §5); 1 outside searched stages.
  None when the space searches no depth."""
  return space.reach(depth_dists)  # jaxprune.search.SearchSpace.reach


def _kept_fraction(f, dists) -> jax.Array:
  """A :class:`Factor`'s kept fraction, linear in the dists."""
  out = jnp.asarray(f.const, jnp.float32)
  for s, m in f.terms:
    out = out + dists[s] @ jnp.asarray(m)
  return out


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _host() -> str:
  """The CPU model and usable cores (what a CPU backend's times depend on)."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  return f"{model}, {cores} cores"


def fingerprint(space, batch_size: int, programs, entries) -> dict:
  """What a table's times are valid for: the device and software that ran them and
  the exact programs and candidate widths they cover."""
  space = as_candidates(space)
  device = jax.local_devices()[0]
  return {
      "backend": jax.default_backend(), "device_kind": device.device_kind,
      "host": _host() if jax.default_backend() == "cpu" else "",
      "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "disable_most_optimizations": bool(jax.config.read("jax_disable_most_optimizations")),
      "batch_size": int(batch_size), "dtype": "float32",
      "candidates": {n: list(c) for n, c in zip(space.names, space.candidates)},
      "programs_sha256": _digest([p.key() for p in programs]),
      "ops_sha256": _digest([[e.op, e.name, e.in_group, e.out_group,
                              e.programs.tolist(), len(e.scaled)] for e in entries]),
  }


# --- the plan: which programs time which entries ------------------------------------

def _sides(op, fs, c_in: int, c_out: int, groups: int):
  """``(input factor, output factor, other factors)`` of an op's FLOPs factors (the
  graph lists the input channel factor first, then the output's)."""
  sizes = [len(ids) for ids in op.factors]
  if op.kind == "conv" and groups > 1:
    if len(fs) == 1 and sizes == [c_out]:
      return None, fs[0], []
    return None, None, list(fs)
  if len(fs) == 2 and sizes == [c_in, c_out]:
    return fs[0], fs[1], []
  if len(fs) == 1 and sizes[0] != c_in and sizes[0] == c_out:
    return None, fs[0], []
  if len(fs) == 1 and sizes[0] == c_in and sizes[0] != c_out:
    return fs[0], None, []
  return None, None, list(fs)


def _side(factor, full: int, candidates):
  """``(group or None, widths per candidate, scaled factor or None)`` of one side."""
  if factor is None or not factor.terms:
    return None, [full], None
  if len(factor.terms) > 1:
    return None, [full], factor
  s, m = factor.terms[0]
  widths = [max(1, int(round(full * (factor.const + float(m[c])))))
            for c in range(len(candidates[s]))]
  return s, widths, None


def _conv_geometry(op):
  """``(channel axis, spatial in, spatial out, window, groups)`` of a conv op."""
  *window, k_in, c_out = op.kernel_shape
  ins, outs = tuple(op.in_shape), tuple(op.out_shape)
  if outs[-1] == c_out and ins[-1] % k_in == 0:
    axis = len(ins) - 1
  elif outs[1] == c_out and ins[1] % k_in == 0:
    axis = 1
  else:
    raise UserError(f"latency table: cannot find the channel axis of conv {op.name} "
                    f"(input {ins}, output {outs}, kernel {op.kernel_shape}).")
  spatial_in = tuple(n for a, n in enumerate(ins) if a not in (0, axis))
  spatial_out = tuple(n for a, n in enumerate(outs) if a not in (0, axis))
  return axis, spatial_in, spatial_out, tuple(window), ins[axis] // k_in


def _stride_padding(size_in: int, size_out: int, window: int):
  """A stride and padding giving ``size_out`` (equal to SAME's where it is SAME)."""
  stride = max(1, -(-size_in // max(size_out, 1)))
  total = max((size_out - 1) * stride + window - size_in, 0)
  return stride, (total // 2, total - total // 2)


def plan(space, batch_size: int) -> LatencyTable:
  """The table's structure at ``batch_size``, with no times yet.

  Args:
    space: a :class:`Candidates` (a graph and candidate widths per group) or a
      :class:`jaxprune.search.SearchSpace` (its searched groups and candidates).
    batch_size: the batch the ops are timed at.
  """
  space = as_candidates(space)
  if int(batch_size) != batch_size or batch_size < 1:
    raise UserError(f"latency table: batch size must be a positive int, got "
                    f"{batch_size!r}.")
  trace_batch = int(space.graph.traced.input_shape[0]) or 1
  programs, index, entries = [], {}, []

  def program(p: Program) -> int:
    key = json.dumps(p.key())
    if key not in index:
      index[key] = len(programs)
      programs.append(p)
    return index[key]

  for i, (op, op_factors) in enumerate(zip(space.graph.ops, factors(space))):
    if op.kind == "conv":
      _, spatial_in, spatial_out, window, groups = _conv_geometry(op)
      c_in_full, c_out = op.kernel_shape[-2] * groups, op.kernel_shape[-1]
    elif op.kind == "dense":
      (c_in_full, c_out), groups = op.kernel_shape, 1
    else:  # a product of two activations (attention): not a layer with widths
      continue
    fin, fout, rest = _sides(op, op_factors, c_in_full, c_out, groups)
    depthwise = op.kind == "conv" and groups > 1 and groups == c_in_full \
        and op.kernel_shape[-2] == 1
    g_in, w_in, s_in = _side(fin, c_in_full, space.candidates)
    g_out, w_out, s_out = _side(fout, c_out, space.candidates)
    scaled = rest + [f for f in (s_in, s_out) if f is not None]
    if op.kind == "conv" and groups > 1 and not depthwise:
      scaled = list(op_factors)  # a grouped conv: timed at full width, scaled in FLOPs
      g_in = g_out = None
      w_in, w_out = [c_in_full], [c_out]
    ids = np.zeros((len(w_in), len(w_out)), np.int64)
    for a, d_in in enumerate(w_in):
      for b, d_out in enumerate(w_out):
        if op.kind == "dense":
          rows = max(1, batch_size * math.prod(op.out_shape) // (trace_batch * c_out))
          p = Program("dense", (rows, d_in), (d_in, d_out))
        else:
          if depthwise:  # the input follows the output (channel multiplier kept)
            d_in, feature_groups = d_out * c_in_full // c_out, d_out * c_in_full // c_out
          else:
            feature_groups = groups
          geometry = [_stride_padding(n_in, n_out, k) for n_in, n_out, k
                      in zip(spatial_in, spatial_out, window)]
          p = Program("conv", (batch_size, *spatial_in, d_in),
                      (*window, d_in // feature_groups, d_out),
                      tuple(s for s, _ in geometry), tuple(pad for _, pad in geometry),
                      feature_groups)
        ids[a, b] = program(p)
    entries.append(Entry(i, op.name, g_in, g_out, ids, scaled))
  if not entries:
    raise UserError("latency table: the model has no conv or dense layer to time.")
  return LatencyTable(space, batch_size, entries, programs)


# --- measuring ----------------------------------------------------------------------

def log_line(text: str):
  """Prints one ``[latency]`` progress line (process 0 only)."""
  if jax.process_index() == 0:
    print(f"[latency] {text}", flush=True)


def time_programs(programs: Sequence[Program], repeats: int = 7,
                  log: Callable[[str], None] = log_line) -> np.ndarray:
  """Median ms of every program on the first local device: all compiled first, then
  ``repeats`` rounds of one sample of each (alternately; a sample averages enough
  back-to-back calls to last about 2 ms)."""
  device = jax.local_devices()[0]
  rng = np.random.default_rng(0)
  arrays = {}

  def array(shape):  # numpy draws: a jax.random draw would compile once per shape
    if shape not in arrays:
      arrays[shape] = jax.device_put(rng.standard_normal(shape, np.float32), device)
    return arrays[shape]

  t0, last = time.perf_counter(), time.perf_counter()
  compiled = []
  for n, p in enumerate(programs):
    x, w = array(p.x_shape), array(p.w_shape)
    fn = jax.jit(p.function()).lower(x, w).compile()
    jax.block_until_ready(fn(x, w))
    compiled.append((fn, x, w))
    if time.perf_counter() - last > 10:
      last = time.perf_counter()
      log(f"compiled {n + 1}/{len(programs)} programs ({last - t0:.0f} s)")
  calls = []
  for fn, x, w in compiled:
    t = time.perf_counter()
    jax.block_until_ready(fn(x, w))
    calls.append(int(min(_MAX_CALLS, max(1, math.ceil(
        _MIN_SAMPLE_S / max(time.perf_counter() - t, 1e-7))))))
  log(f"timing {len(programs)} programs x {repeats} rounds")
  samples = np.zeros((repeats, len(programs)))
  for r in range(repeats):
    order = range(len(programs)) if r % 2 == 0 else reversed(range(len(programs)))
    for n in order:
      fn, x, w = compiled[n]
      t = time.perf_counter()
      for _ in range(calls[n]):
        out = fn(x, w)
      jax.block_until_ready(out)
      samples[r, n] = (time.perf_counter() - t) / calls[n]
  return np.median(samples, axis=0) * 1e3


def measure(space, batch_size: int, *, repeats: int = 7,
            timer: Callable[[Sequence[Program]], Sequence[float]] | None = None,
            log: Callable[[str], None] = log_line) -> LatencyTable:
  """Times the table of ``space`` at ``batch_size`` on this process's first device.

  Args:
    space: a :class:`Candidates` or a :class:`jaxprune.search.SearchSpace`.
    batch_size: the batch of the timed ops (the run's inference batch).
    repeats: timing rounds (the median is kept).
    timer: ``programs -> ms`` (default :func:`time_programs`), e.g. for tests.
    log: where progress lines go.
  """
  table = plan(space, batch_size)
  t0 = time.perf_counter()
  log(f"measuring {len(table.programs)} distinct programs for the {len(table.entries)} "
      f"conv/dense ops at batch {batch_size} on {jax.default_backend()} "
      f"({jax.local_devices()[0].device_kind}); the CLI caches it in the workdir")
  ms = (timer(table.programs) if timer is not None else
        time_programs(table.programs, repeats, log))
  table.set_program_ms(ms)
  if not np.all(np.isfinite(table.program_ms)) or np.any(table.program_ms <= 0):
    raise ValueError("latency table: a program's measured time is not positive.")
  table.source = "measured"
  log(f"full network {table.full:.3f} ms (sum of {len(table.entries)} ops) in "
      f"{time.perf_counter() - t0:.0f} s")
  return table


def _differences(old: Mapping, new: Mapping) -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    if old.get(k) != new.get(k):
      if k.endswith("_sha256") or k == "candidates":
        out.append(f"{k.removesuffix('_sha256')} (the model's searched ops differ)")
      else:
        out.append(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here")
  return out


def load(space, path: str, batch_size: int) -> tuple[LatencyTable | None, str]:
  """The table cached at ``path`` if its fingerprint is this run's: ``(table, "")``;
  else ``(None, why not)``. A damaged file is a :class:`UserError`."""
  table = plan(space, batch_size)
  if not os.path.exists(path):
    return None, f"no table at {path}"
  saved = jsonio.read_json(path)
  if not isinstance(saved, dict) or saved.get("format") != FORMAT:
    raise UserError(f"{path} is not a jaxprune latency table; delete it (the run "
                    "measures a new one).")
  if saved.get("fingerprint") != table.fingerprint:
    diff = _differences(saved.get("fingerprint") or {}, table.fingerprint)
    return None, f"the table at {path} was measured for another setting: " + "; ".join(diff)
  table.set_program_ms(saved["program_ms"])
  table.source = "cache"
  return table, ""


def load_or_measure(space, path: str, batch_size: int, *, repeats: int = 7,
                    timer=None, log: Callable[[str], None] = log_line) -> LatencyTable:
  """The cached table at ``path`` when its fingerprint matches; else a new
  measurement, saved there (a mismatched cache is replaced, with a message)."""
  table, why = load(space, path, batch_size)
  if table is not None:
    log(f"using the table measured before ({path}; full network {table.full:.3f} ms)")
    return table
  if os.path.exists(path):
    log(f"{why}; measuring again")
  table = measure(space, batch_size, repeats=repeats, timer=timer, log=log)
  table.save(path)
  log(f"saved {path}")
  return table


__all__ = ["Candidates", "Entry", "Factor", "LatencyTable", "OutOfMemory", "Program",
           "as_candidates", "factors", "fingerprint", "load", "load_or_measure", "measure", "plan",
           "space_reach", "time_programs"]
