"""Run figures (``<workdir>/plots/*.png``) from records a run wrote. numpy + matplotlib
only (no JAX, no pyplot state)."""

from collections.abc import Mapping, Sequence
import math
import numbers
import os
import re

from matplotlib import colors as mcolors
from matplotlib import patches
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

_DPI = 120
_MFLOPS = 1e6
# Conv names of the searchable ResNet: "stage<s>_block<b>/...".
_BLOCK_NAME = re.compile(r"stage(\d+)_block(\d+)")
_HISTORY_KEYS = ("epoch", "expected_flops", "argmax_flops", "flops_max", "target_flops",
                 "tolerance_flops", "cost_mode", "width_candidates", "width_probs",
                 "depth_candidates", "depth_probs", "argmax_widths", "argmax_blocks")


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=_DPI)
  return path


def _check_history(history: Sequence[Mapping]) -> None:
  """Raises ValueError unless ``history`` is a non-empty, consistent history."""
  if not history:
    raise ValueError("empty TAS architecture history: nothing to plot (is "
                     "<workdir>/search/arch_history.jsonl empty or missing?)")
  num_convs = num_stages = None
  for i, entry in enumerate(history):
    missing = [k for k in _HISTORY_KEYS if k not in entry]
    if missing:
      raise ValueError(f"architecture history entry {i} lacks keys {missing}")
    cands, probs = entry["width_candidates"], entry["width_probs"]
    dcands, dprobs = entry["depth_candidates"], entry["depth_probs"]
    if len(cands) != len(probs) or any(len(c) != len(p) for c, p in zip(cands, probs)):
      raise ValueError(f"architecture history entry {i}: width_probs do not match the "
                       "shapes of width_candidates")
    if len(dcands) != len(dprobs) or any(len(c) != len(p) for c, p in zip(dcands, dprobs)):
      raise ValueError(f"architecture history entry {i}: depth_probs do not match the "
                       "shapes of depth_candidates")
    if num_convs is None:
      num_convs, num_stages = len(cands), len(dcands)
    elif (len(cands), len(dcands)) != (num_convs, num_stages):
      raise ValueError(f"architecture history entry {i} has {len(cands)} convs and "
                       f"{len(dcands)} stages; entry 0 has {num_convs} and {num_stages}")


def _conv_labels(entry: Mapping) -> list[str]:
  names = entry.get("conv_names")
  if names and len(names) == len(entry["width_candidates"]):
    return [str(n) for n in names]
  return [f"conv{i}" for i in range(len(entry["width_candidates"]))]


def _padded(rows: Sequence[Sequence[float]]) -> np.ndarray:
  out = np.full((len(rows), max((len(r) for r in rows), default=0)), np.nan)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def width_prob_matrix(history_entry: Mapping) -> np.ndarray:
  """The width-probability heatmap of one search epoch.

  Args:
    history_entry: one architecture-history record (needs ``width_probs``).

  Returns:
    float array ``[num_convs, max_candidates]``: row ``i`` holds conv ``i``'s
    probabilities over its width candidates, NaN-padded where a conv has fewer
    candidates than the widest one.
  """
  return _padded(history_entry["width_probs"])


def expected_width_fraction(history: Sequence[Mapping]) -> np.ndarray:
  """Expected width over full width, per conv and epoch: ``sum_j p_j C_j / max_j C_j``.

  Args:
    history: the architecture history (one record per search epoch).

  Returns:
    float array ``[num_convs, num_epochs]`` in ``[0, 1]``.
  """
  _check_history(history)
  cols = []
  for entry in history:
    cols.append([np.dot(p, c) / max(c)
                 for c, p in zip(entry["width_candidates"], entry["width_probs"])])
  return np.asarray(cols, dtype=float).T


def flops_band(history_entry: Mapping) -> tuple[float, float]:
  """The accepted FLOPs interval ``(low, high)`` of the cost loss (tas.md §5).

  ``cost_mode == "code"`` (the official code) accepts ``[target - tol, target]``;
  ``"paper"`` accepts ``[target (1 - t), target (1 + t)]`` with
  ``t = tolerance_flops / flops_max``.

  Args:
    history_entry: one architecture-history record.

  Returns:
    ``(low, high)`` in FLOPs.
  """
  target = float(history_entry["target_flops"])
  tol = float(history_entry["tolerance_flops"])
  mode = history_entry["cost_mode"]
  if mode == "code":
    return target - tol, target
  if mode == "paper":
    t = tol / float(history_entry["flops_max"])
    return target * (1.0 - t), target * (1.0 + t)
  raise ValueError(f"unknown cost_mode {mode!r} in the architecture history; expected "
                   "'code' or 'paper'")


def _flops_figure(history: Sequence[Mapping]) -> Figure:
  epochs = np.array([e["epoch"] for e in history], dtype=float)
  bands = np.array([flops_band(e) for e in history]) / _MFLOPS
  fmax = np.array([e["flops_max"] for e in history], dtype=float) / _MFLOPS
  fig = _new_figure(7.0, 4.2)
  ax = fig.add_subplot()
  mode = history[-1]["cost_mode"]
  band_label = f"target band ({mode})"
  if len(history) == 1 or np.allclose(bands, bands[0]):
    ax.axhspan(bands[-1, 0], bands[-1, 1], color="tab:green", alpha=0.2, label=band_label)
  else:
    ax.fill_between(epochs, bands[:, 0], bands[:, 1], color="tab:green", alpha=0.2,
                    label=band_label)
  if len(history) == 1 or np.allclose(fmax, fmax[0]):
    ax.axhline(fmax[-1], color="black", ls="--", lw=1, label="full network (flops_max)")
  else:
    ax.plot(epochs, fmax, color="black", ls="--", lw=1, label="full network (flops_max)")
  ax.plot(epochs, [e["expected_flops"] / _MFLOPS for e in history], marker="o", ms=3,
          color="tab:blue", label="expected (soft)")
  ax.plot(epochs, [e["argmax_flops"] / _MFLOPS for e in history], marker="s", ms=3,
          color="tab:orange", label="argmax architecture")
  ax.set_xlabel("search epoch")
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_ylabel("MFLOPs (multiply-accumulates)")
  ax.set_ylim(bottom=0, top=1.08 * max(fmax.max(), bands.max()))
  ax.set_title(f"TAS search cost: target {history[-1]['target_flops'] / _MFLOPS:.2f} M "
               f"({history[-1]['target_flops'] / history[-1]['flops_max']:.0%} of full)")
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  return fig


def _width_probs_figure(history: Sequence[Mapping]) -> Figure:
  last = history[-1]
  probs = width_prob_matrix(last)
  cands = _padded(last["width_candidates"])
  labels = _conv_labels(last)
  num_convs, num_cands = probs.shape
  two_panels = len(history) >= 2
  height = max(3.5, 0.3 * num_convs + 1.6)
  fig = _new_figure(12.0 if two_panels else 7.0, height)
  axes = fig.subplots(1, 2, width_ratios=[num_cands, max(num_cands, 8)]) if two_panels else [
      fig.add_subplot()]

  ax = axes[0]
  cmap = mcolors.LinearSegmentedColormap.from_list(
      "p", ["white", "tab:blue"]).with_extremes(bad="0.85")
  im = ax.imshow(np.ma.masked_invalid(probs), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                 interpolation="nearest")
  for i in range(num_convs):
    for j in range(num_cands):
      if np.isnan(probs[i, j]):
        continue
      ax.text(j, i, f"{cands[i, j]:.0f}", ha="center", va="center", fontsize=7,
              color="white" if probs[i, j] > 0.6 else "black")
    # Box the argmax width: the architecture that would be derived now.
    chosen = np.flatnonzero(cands[i] == last["argmax_widths"][i])
    if chosen.size:
      ax.add_patch(patches.Rectangle((chosen[0] - 0.5, i - 0.5), 1, 1, fill=False,
                                     ec="tab:red", lw=1.5))
  ax.set_yticks(range(num_convs), labels, fontsize=7)
  ax.set_xticks(range(num_cands))
  ax.set_xlabel("width candidate index (cell text: channels; red box: argmax)")
  ax.set_title(f"width probabilities, epoch {last['epoch']}")
  fig.colorbar(im, ax=ax, label="probability", shrink=0.8, pad=0.01)

  if two_panels:
    ax = axes[1]
    frac = expected_width_fraction(history)
    epochs = [e["epoch"] for e in history]
    im = ax.imshow(frac, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    ax.set_yticks(range(num_convs), labels, fontsize=7)
    step = max(1, math.ceil(len(epochs) / 12))
    ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]], fontsize=8)
    ax.set_xlabel("search epoch")
    ax.set_title("expected width / full width")
    fig.colorbar(im, ax=ax, label="fraction", shrink=0.8, pad=0.01)
  return fig


def _depth_probs_figure(history: Sequence[Mapping]) -> Figure:
  epochs = [e["epoch"] for e in history]
  last = history[-1]
  num_stages = len(last["depth_candidates"])
  fig = _new_figure(max(4.0, 3.6 * num_stages), 3.4)
  axes = np.atleast_1d(fig.subplots(1, num_stages, sharey=True, squeeze=False)[0])
  for s, ax in enumerate(axes):
    probs = np.array([e["depth_probs"][s] for e in history], dtype=float)
    for j, depth in enumerate(last["depth_candidates"][s]):
      ax.plot(epochs, probs[:, j], marker="o", ms=3, label=f"depth {depth}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("search epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    names = last.get("stage_names") or []
    name = names[s] if s < len(names) else f"stage {s}"
    ax.set_title(f"{name} (argmax depth {last['argmax_blocks'][s]})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  axes[0].set_ylabel("depth probability")
  return fig


def _derived_widths_figure(history: Sequence[Mapping]) -> Figure:
  last = history[-1]
  labels = _conv_labels(last)
  full = np.array([max(c) for c in last["width_candidates"]], dtype=float)
  chosen = np.array(last["argmax_widths"], dtype=float)
  kept = list(last["argmax_blocks"])
  max_blocks = [max(c) for c in last["depth_candidates"]]
  # Convs of blocks that the depth choice drops (only known from the names).
  dropped = np.zeros(len(labels), dtype=bool)
  skipped = last.get("skipped_blocks")  # a graph search names the dropped modules
  for i, name in enumerate(labels):
    m = _BLOCK_NAME.search(name)
    if skipped is not None:
      dropped[i] = any(name == p or name.startswith(p + "/") for p in skipped)
    elif m and int(m.group(1)) < len(kept):
      dropped[i] = int(m.group(2)) >= kept[int(m.group(1))]
  x = np.arange(len(labels))
  fig = _new_figure(max(6.0, 0.38 * len(labels) + 2.0), 4.6)
  ax = fig.add_subplot()
  ax.bar(x, full, width=0.8, color="0.82", label="full width")
  ax.bar(x[~dropped], chosen[~dropped], width=0.55, color="tab:blue", label="argmax width")
  if dropped.any():
    ax.bar(x[dropped], chosen[dropped], width=0.55, color="none", ec="tab:blue",
           hatch="///", label="argmax width (block dropped)")
  ax.set_xticks(x, labels, rotation=90, fontsize=7)
  ax.set_xlim(-0.6, len(labels) - 0.4)
  ax.set_ylabel("output channels")
  blocks = ("blocks kept per stage: " + ", ".join(f"{k}/{m}" for k, m in zip(kept, max_blocks))
            if max_blocks else "no depth search")
  ax.set_title(f"derived widths at epoch {last['epoch']}; {blocks}; "
               f"{last['argmax_flops'] / _MFLOPS:.2f} of {last['flops_max'] / _MFLOPS:.2f} "
               "MFLOPs", fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left")
  return fig


def tas_search_figures(history: Sequence[Mapping]) -> dict[str, Figure]:
  """Builds the TAS search figures without writing them (for notebooks and tests).

  Args:
    history: the records of ``<workdir>/search/arch_history.jsonl``, one per
      search epoch, oldest first.

  Returns:
    ``{"flops", "width_probs", "depth_probs", "derived_widths"}`` -> Figure, as
    described in :func:`tas_search` (no ``depth_probs`` without depth candidates).

  Raises:
    ValueError: on an empty or inconsistent history.
  """
  _check_history(history)
  figures = {"flops": _flops_figure(history), "width_probs": _width_probs_figure(history)}
  if history[-1]["depth_candidates"]:  # a graph search (jaxprune.search) has no depths
    figures["depth_probs"] = _depth_probs_figure(history)
  figures["derived_widths"] = _derived_widths_figure(history)
  return figures


def tas_search(history: Sequence[Mapping], out_dir: str) -> list[str]:
  """Draws the TAS search figures from an architecture history.

  Args:
    history: the records of ``<workdir>/search/arch_history.jsonl``, one per
      search epoch, oldest first.
    out_dir: directory for the PNGs (created if missing), usually
      ``<workdir>/plots``.

  Returns:
    The paths written: ``flops.png`` (expected and argmax FLOPs against the
    target band and the full network), ``width_probs.png`` (last-epoch width
    probabilities, plus the expected width fraction per conv over epochs when
    there are two or more), ``depth_probs.png`` (depth probabilities per stage
    over epochs) and ``derived_widths.png`` (full vs argmax width per conv).

  Raises:
    ValueError: on an empty or inconsistent history.
  """
  figures = tas_search_figures(history)
  os.makedirs(out_dir, exist_ok=True)
  return [_save(fig, os.path.join(out_dir, f"{name}.png")) for name, fig in figures.items()]


def _is_scalar(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def training_curves(records: Sequence[Mapping], out_path: str,
                    keys: Sequence[str] = ("train_loss", "eval_accuracy")) -> str:
  """Draws one panel per metric against the step, from ``metrics.jsonl`` records.

  Keys absent from every record (or never scalar) are skipped. When a resumed
  run logged a step twice, the later record wins.

  Args:
    records: ``metrics.jsonl`` records, each with a ``step``.
    out_path: the PNG to write; its directory is created if missing.
    keys: the metrics to draw, one panel each.

  Returns:
    ``out_path``.

  Raises:
    ValueError: when there are no records or none of ``keys`` is in them.
  """
  if not records:
    raise ValueError(f"no metric records to plot for {out_path}")
  series = {}
  for key in keys:
    points = {int(r["step"]): float(r[key]) for r in records
              if "step" in r and _is_scalar(r.get(key))}
    if points:
      steps = sorted(points)
      series[key] = (steps, [points[s] for s in steps])
  if not series:
    present = sorted({k for r in records for k in r if k != "step"})
    raise ValueError(f"none of the keys {list(keys)} is in the metric records; they have "
                     f"{present}")
  fig = _new_figure(max(4.5, 4.2 * len(series)), 3.4)
  axes = fig.subplots(1, len(series), squeeze=False)[0]
  for ax, (key, (steps, values)) in zip(axes, series.items()):
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
    ax.set_xlabel("step")
    ax.set_title(key, fontsize=10)
    ax.grid(alpha=0.3)
  parent = os.path.dirname(out_path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  return _save(fig, out_path)


# --- AutoPrune -------------------------------------------------------------------------


def autoprune_kept_figure(history: Sequence[Mapping]) -> Figure:
  """Kept fraction of every pruned layer (and in total) against the epoch.

  ``history`` is ``<workdir>/prune/kept_history.jsonl``: records with ``epoch``,
  ``kept`` ({layer: fraction}) and ``total_kept_fraction``.
  """
  if not history:
    raise ValueError("no AutoPrune history records to plot")
  epochs = [float(r["epoch"]) for r in history]
  layers = list(dict.fromkeys(k for r in history for k in r["kept"]))
  fig = _new_figure(6.0, 3.8)
  ax = fig.subplots()
  for layer in layers:
    ax.plot(epochs, [r["kept"].get(layer, np.nan) for r in history], label=layer,
            marker="o" if len(epochs) < 30 else None, ms=3)
  ax.plot(epochs, [r["total_kept_fraction"] for r in history], "k--", label="total")
  ax.set_yscale("log")
  ax.set_xlabel("epoch")
  ax.set_ylabel("kept fraction")
  ax.set_title("AutoPrune: kept weights per layer", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return fig


def autoprune_kept(history: Sequence[Mapping], out_dir: str) -> list[str]:
  """Writes ``<out_dir>/kept_fraction.png``; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  return [_save(autoprune_kept_figure(history), os.path.join(out_dir, "kept_fraction.png"))]


# --- DNW -------------------------------------------------------------------------------


def dnw_wiring_figure(export: Mapping) -> Figure:
  """One panel per graph block: the learned edges as a source x target image.

  Pixel (u, v) shows |w_uv| of a kept edge after dead-node removal (white: no
  edge); ticks mark where one layer's nodes end. ``export`` is the dict
  written to ``wiring.json`` (``jaxprune.models.dnw.export_wiring``).
  """
  blocks = [b for b in export.get("blocks", []) if "edge_list" in b]
  if not blocks:
    raise ValueError("the wiring export has no edge lists to plot "
                     "(export_wiring(..., with_edges=True))")
  cols = min(len(blocks), 3)
  rows = math.ceil(len(blocks) / cols)
  fig = _new_figure(4.2 * cols, 3.8 * rows)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, block in zip(axes, blocks):
    edges = np.asarray(block["edge_list"], np.float64).reshape(-1, 3)
    offset = block["nodes"] - block["targets"]  # target node id -> column
    image = np.full((block["sources"], block["targets"]), np.nan)
    if len(edges):
      image[edges[:, 0].astype(int), edges[:, 1].astype(int) - offset] = np.abs(edges[:, 2])
    shown = ax.imshow(image, aspect="auto", interpolation="nearest", cmap="viridis",
                      norm=mcolors.LogNorm() if np.nanmin(image, initial=1) > 0 else None)
    fig.colorbar(shown, ax=ax, label="|w| of kept edge", shrink=0.8)
    ax.set_title(f"{block['name']}: {block['executed_edges']:,} edges, "
                 f"{block['live_nodes']}/{block['nodes']} live nodes", fontsize=9)
    ax.set_xlabel("target node")
    ax.set_ylabel("source node")
  for ax in axes[len(blocks):]:
    ax.set_visible(False)
  return fig


def dnw_wiring(export: Mapping, out_path: str) -> str:
  """Draws :func:`dnw_wiring_figure` to ``out_path`` (created directories); returns it."""
  fig = dnw_wiring_figure(export)
  parent = os.path.dirname(out_path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  return _save(fig, out_path)


# --- ISTA ------------------------------------------------------------------------------
# Records are lines of ``<workdir>/<stage>/gamma_history.jsonl`` written by
# ``jaxprune.methods.ista``: ``stage``, ``step``, ``zero_fraction``,
# ``layer_zero_fraction`` ({bn scale path: fraction}) and ``gammas`` ({path: values}).


def ista_zero_fraction_figure(history: Sequence[Mapping]) -> Figure:
  """Fraction of exactly-zero gammas against the step: in total and per layer.

  Stage boundaries are drawn as vertical lines. Records of stages without the prox
  (``l1`` = 0: fine-tuning the pruned network, which has no zero gammas left) are
  left out.
  """
  history = [r for r in history if r.get("l1", 1.0) != 0]
  if not history:
    raise ValueError("empty ISTA gamma history: nothing to plot")
  steps = [int(r["step"]) for r in history]
  fig = _new_figure(7.5, 3.8)
  ax = fig.subplots()
  layers = list(dict.fromkeys(k for r in history for k in r.get("layer_zero_fraction", {})))
  for name in layers:
    pts = [(int(r["step"]), r["layer_zero_fraction"][name]) for r in history
           if name in r.get("layer_zero_fraction", {})]
    ax.plot(*zip(*pts), lw=0.8, alpha=0.5)
  ax.plot(steps, [r["zero_fraction"] for r in history], color="black", lw=2,
          label="all prunable gammas")
  previous = None
  for r in history:
    if r.get("stage") != previous and previous is not None:
      ax.axvline(int(r["step"]), color="grey", ls="--", lw=0.8)
      ax.text(int(r["step"]), 1.01, str(r["stage"]), fontsize=7, va="bottom",
              transform=ax.get_xaxis_transform())
    previous = r.get("stage")
  ax.set_xlabel("step")
  ax.set_ylabel("fraction of gammas == 0")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left")
  return fig


def ista_gamma_histogram_figure(snapshots: Mapping[str, Sequence[float]]) -> Figure:
  """Histograms of gamma values, one panel per snapshot (e.g. the end of each stage).

  Exact zeros are counted separately and written in each panel's title: a
  histogram bin cannot tell an exact zero from a small value.
  """
  if not snapshots:
    raise ValueError("no gamma snapshots to plot")
  fig = _new_figure(max(4.0, 3.6 * len(snapshots)), 3.2)
  axes = fig.subplots(1, len(snapshots), squeeze=False)[0]
  for ax, (title, values) in zip(axes, snapshots.items()):
    values = np.asarray(values, dtype=float)
    zeros = int(np.sum(values == 0))
    ax.hist(values[values != 0], bins=40, color="tab:blue", alpha=0.8)
    ax.set_title(f"{title}\n{zeros}/{values.size} exactly 0", fontsize=9)
    ax.set_xlabel("gamma")
    ax.grid(alpha=0.3)
  return fig


def ista_figures(history: Sequence[Mapping], out_dir: str) -> list[str]:
  """Writes ``ista_zero_fraction.png`` and ``ista_gamma_histograms.png`` (the last
  record of each stage, plus the first record when it precedes them)."""
  snapshots = {}
  for r in history:
    snapshots[f"end of {r.get('stage')}"] = [g for v in r.get("gammas", {}).values()
                                             for g in v]
  if history and history[0].get("gammas"):
    first = history[0]
    snapshots = {f"{first.get('stage')} epoch {first.get('epoch')}":
                 [g for v in first["gammas"].values() for g in v], **snapshots}
  os.makedirs(out_dir, exist_ok=True)
  return [_save(ista_zero_fraction_figure(history),
                os.path.join(out_dir, "ista_zero_fraction.png")),
          _save(ista_gamma_histogram_figure(snapshots),
                os.path.join(out_dir, "ista_gamma_histograms.png"))]
