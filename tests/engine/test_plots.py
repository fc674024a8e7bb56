"""Tests for jaxprune.plots: readable PNGs, the drawn data, clear errors."""
import json
import os
import subprocess
import sys

from conftest import REPO
from matplotlib import image as mimage
import numpy as np
import pytest

from jaxprune import plots

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TAS_FILES = ("flops.png", "width_probs.png", "depth_probs.png", "derived_widths.png")


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _resnet20_history(rng, num_epochs):
  """A random but consistent TAS history for a ResNet-20 search space.

  19 convs (stem + 3 stages x 3 blocks x 2 convs) of widths 16/32/64 with 8
  candidates each; 3 stages with depth candidates (1, 2, 3).
  """
  names, full = ["stem"], [16]
  for s, width in enumerate((16, 32, 64)):
    for b in range(3):
      names += [f"stage{s}_block{b}/conv_a", f"stage{s}_block{b}/conv_b"]
      full += [width, width]
  cands = [np.ceil(c * np.linspace(0.25, 1.0, 8)).astype(int).tolist() for c in full]
  flops_max = 40813194
  history = []
  for epoch in range(num_epochs):
    width_probs = [_softmax(rng.normal(size=8)).tolist() for _ in cands]
    depth_probs = [_softmax(rng.normal(size=3)).tolist() for _ in range(3)]
    history.append({
        "epoch": epoch, "step": 40 * (epoch + 1), "tau": 10.0 - 0.5 * epoch,
        "expected_flops": float(rng.uniform(0.3, 0.9) * flops_max),
        "argmax_flops": int(rng.uniform(0.3, 0.9) * flops_max),
        "flops_max": flops_max, "target_flops": 0.47 * flops_max,
        "tolerance_flops": 0.05 * flops_max, "cost_mode": "code",
        "width_candidates": cands, "width_probs": width_probs,
        "depth_candidates": [[1, 2, 3]] * 3, "depth_probs": depth_probs,
        "argmax_widths": [c[int(np.argmax(p))] for c, p in zip(cands, width_probs)],
        "argmax_blocks": [int(np.argmax(p)) + 1 for p in depth_probs],
        "conv_names": names,
    })
  return history


def _assert_readable_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == _PNG_SIGNATURE, path
  img = mimage.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)


def test_tas_search_writes_four_readable_pngs(tmp_path):
  history = _resnet20_history(np.random.default_rng(), num_epochs=6)
  out_dir = tmp_path / "plots"
  paths = plots.tas_search(history, str(out_dir))
  assert [os.path.basename(p) for p in paths] == list(_TAS_FILES)
  for p in paths:
    assert os.path.dirname(p) == str(out_dir)
    _assert_readable_png(p)


def test_tas_search_single_epoch_draws_one_width_panel(tmp_path):
  history = _resnet20_history(np.random.default_rng(), num_epochs=1)
  figures = plots.tas_search_figures(history)
  # Probability heatmap + its colour bar, no expected-fraction panel.
  assert len(figures["width_probs"].axes) == 2
  for p in plots.tas_search(history, str(tmp_path)):
    _assert_readable_png(p)


def test_width_heatmap_draws_last_epoch_probabilities():
  history = _resnet20_history(np.random.default_rng(), num_epochs=4)
  fig = plots.tas_search_figures(history)["width_probs"]
  drawn = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)
  np.testing.assert_array_equal(drawn, np.array(history[-1]["width_probs"]))
  # Second panel: expected width fraction, conv x epoch.
  assert fig.axes[0].images[0].get_array().shape == (19, 8)
  assert [im.get_array().shape for ax in fig.axes[1:] for im in ax.images] == [(19, 4)]


def test_width_prob_matrix_pads_short_convs_with_nan():
  entry = {"width_candidates": [[2, 4, 8], [3, 6]],
           "width_probs": [[0.2, 0.3, 0.5], [0.6, 0.4]]}
  expected = np.array([[0.2, 0.3, 0.5], [0.6, 0.4, np.nan]])
  np.testing.assert_array_equal(plots.width_prob_matrix(entry), expected)


def test_expected_width_fraction_matches_loop_reference():
  history = _resnet20_history(np.random.default_rng(), num_epochs=3)
  frac = plots.expected_width_fraction(history)
  assert frac.shape == (19, 3)
  for t, entry in enumerate(history):
    for i, (c, p) in enumerate(zip(entry["width_candidates"], entry["width_probs"])):
      ref = sum(pj * cj for pj, cj in zip(p, c)) / max(c)
      assert frac[i, t] == pytest.approx(ref)
  assert np.all((frac > 0) & (frac <= 1))


def test_flops_band_follows_cost_mode():
  entry = {"target_flops": 100.0, "tolerance_flops": 10.0, "flops_max": 200.0}
  assert plots.flops_band({**entry, "cost_mode": "code"}) == pytest.approx((90.0, 100.0))
  assert plots.flops_band({**entry, "cost_mode": "paper"}) == pytest.approx((95.0, 105.0))
  with pytest.raises(ValueError, match="cost_mode"):
    plots.flops_band({**entry, "cost_mode": "other"})


def test_empty_history_raises(tmp_path):
  with pytest.raises(ValueError, match="empty"):
    plots.tas_search([], str(tmp_path))
  assert not os.listdir(tmp_path)


def test_inconsistent_history_names_the_entry(tmp_path):
  history = _resnet20_history(np.random.default_rng(), num_epochs=2)
  history[1]["width_probs"] = history[1]["width_probs"][:-1]
  with pytest.raises(ValueError, match="entry 1"):
    plots.tas_search(history, str(tmp_path))


def test_training_curves_writes_png_and_skips_absent_keys(tmp_path):
  rng = np.random.default_rng()
  records = [{"step": s, "train_loss": float(v)}
             for s, v in enumerate(np.exp(-np.linspace(0, 3, 20)) + rng.uniform(0, .1, 20))]
  records += [{"step": 19, "eval_accuracy": 0.8}]
  out = tmp_path / "plots" / "train.png"
  path = plots.training_curves(records, str(out),
                               keys=("train_loss", "eval_accuracy", "not_logged"))
  assert path == str(out)
  _assert_readable_png(path)
  with pytest.raises(ValueError, match="none of the keys"):
    plots.training_curves(records, str(tmp_path / "x.png"), keys=("not_logged",))
  with pytest.raises(ValueError, match="no metric records"):
    plots.training_curves([], str(tmp_path / "x.png"))


def test_module_imports_neither_jax_nor_pyplot():
  code = ("import sys, json, jaxprune.plots; "
          "print(json.dumps(sorted(m for m in sys.modules "
          "if m.split('.')[0] == 'jax' or m == 'matplotlib.pyplot')))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=60, check=True)
  assert json.loads(proc.stdout) == []
