"""The command line: clear one-line errors, and the smoke run end to end."""
import json

import pytest

from cli import run_main as _main


def _assert_clean_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-2000:]
  for n in needles:
    assert n in last, last


def test_typo_in_override_names_the_key_and_suggests(tmp_path):
  proc = _main("--config", "configs/baseline_resnet.py", "--config.train.learning_rat=0.2",
               "--workdir", str(tmp_path))
  _assert_clean_error(proc, "train.learning_rat", "--config.train.learning_rate")


@pytest.mark.slow
def test_override_into_a_value_names_it(tmp_path):
  # model.kwargs is a string (a dict literal); train.epochs an int: neither has keys.
  for flag, needles in (("--config.model.kwargs.depth=20",
                         ("model.kwargs is a value (str)", "--config.model.kwargs=")),
                        ("--config.train.epochs.x=1", ("train.epochs is a value (int)",))):
    proc = _main("--config", "configs/baseline_resnet.py", flag, "--workdir", str(tmp_path))
    _assert_clean_error(proc, *needles)


def test_unknown_config_argument(tmp_path):
  proc = _main("--config", "configs/baseline_resnet.py:dept=56", "--workdir", str(tmp_path))
  _assert_clean_error(proc, "'dept'", "depth")


def test_unknown_dataset(tmp_path):
  proc = _main("--config", "configs/baseline_resnet.py:dataset=cifar11",
               "--workdir", str(tmp_path))
  _assert_clean_error(proc, "cifar11", "cifar10")


def test_missing_manual_dir(tmp_path):
  proc = _main("--config", "configs/baseline_lenet.py",
               f"--config.dataset.data_dir={tmp_path / 'tfds'}",
               f"--config.dataset.manual_dir={tmp_path / 'no_such_dir'}",
               "--workdir", str(tmp_path / "run"))
  _assert_clean_error(proc, "no_such_dir")


def test_workdir_with_incompatible_config(tmp_path):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from jaxprune import config_lib  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  # A run of the smoke config that has made progress (a checkpoint step directory).
  config_lib.check_workdir(str(workdir), load_config("configs/baseline_resnet.py", "smoke"))
  config_lib.release_workdir(str(workdir))
  (workdir / "baseline" / "checkpoints" / "32").mkdir(parents=True)
  second = _main("--config", "configs/baseline_resnet.py:smoke,depth=32",
                 "--workdir", str(workdir))
  _assert_clean_error(second, "model.depth", "20", "32", "--workdir")


@pytest.mark.slow
def test_failed_start_writes_nothing_and_its_advice_works(tmp_path):
  workdir = tmp_path / "run"
  # A released ResNet-56 shape with the default depth: refused before any work.
  first = _main("--config", "configs/tas_resnet.py:smoke,shape=C010-ResNet56",
                "--config.tas.teacher_dir=" + str(tmp_path / "no_teacher"),
                "--workdir", str(workdir))
  _assert_clean_error(first, "add depth=56")
  assert not workdir.exists()
  # Following the advice gets past that check (to the next one: the missing teacher).
  second = _main("--config", "configs/tas_resnet.py:smoke,shape=C010-ResNet56,depth=56",
                 "--config.tas.teacher_dir=" + str(tmp_path / "no_teacher"),
                 "--workdir", str(workdir))
  _assert_clean_error(second, "tas.teacher_dir", "no_teacher")
  assert not workdir.exists()


def test_missing_config_file_is_one_line(tmp_path):
  proc = _main("--config", "configs/tas_resnett.py:smoke", "--workdir", str(tmp_path))
  _assert_clean_error(proc, "configs/tas_resnett.py")


@pytest.mark.e2e
def test_smoke_config_end_to_end_writes_report(tmp_path):
  workdir = tmp_path / "smoke"
  # ResNet-8 (one block per stage) keeps the run short; ResNet-20's 40,813,194 FLOPs are
  # checked against the official count in test_graph.
  proc = _main("--config", "configs/baseline_resnet.py:smoke,depth=8", "--workdir",
               str(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  for key in ("test_accuracy", "flops", "params", "wall_time_s", "inference_ms"):
    assert key in report
  # ResNet-8 on 32x32x3 by hand: stem 3x3x3x16 at 32x32, then per stage a 3x3 conv pair
  # (16 at 32x32; 32 at 16x16 with a 16->32 first conv; 64 at 8x8 with 32->64), the 1x1
  # projection shortcuts of stages 2 and 3, the classifier 64x10 plus its 10 bias adds.
  hand = (32 * 32 * 27 * 16 + 32 * 32 * 9 * 16 * 16 * 2 + 16 * 16 * 9 * (16 * 32 + 32 * 32)
          + 8 * 8 * 9 * (32 * 64 + 64 * 64) + 16 * 16 * 16 * 32 + 8 * 8 * 32 * 64
          + 64 * 10 + 10)
  assert report["flops"] == hand
  assert report["test_accuracy"] > 0.3  # synthetic data is learnable; chance is 0.1
  assert (workdir / "report.md").exists()
  assert (workdir / "baseline" / "final").is_dir()
  assert "img/s" in proc.stdout and "ETA" in proc.stdout
  # The XLA:CPU-tuned settings, chosen from the backend (config.runtime, all "auto"); the
  # conv flag by the runtime rule: ResNet-8 at batch 128 is too little conv work a call.
  assert ("[runtime] backend cpu: jaxprune layers, XLA:CPU flag off, allocator tuning on"
          in proc.stdout), proc.stdout[:2000]
  assert list((workdir / "baseline" / "tensorboard").iterdir())
  # Rerunning the finished command resumes nothing and reports the same accuracy; the
  # runtime section may change between runs of a workdir (how it runs, not what).
  again = _main("--config", "configs/baseline_resnet.py:smoke,depth=8", "--workdir",
                str(workdir), "--config.runtime.layers=stock",
                "--config.runtime.malloc_tuning=off")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "backend cpu: stock layers, XLA:CPU flag off, allocator tuning off" in again.stdout
  assert json.loads((workdir / "report.json").read_text())["test_accuracy"] == \
      report["test_accuracy"]
