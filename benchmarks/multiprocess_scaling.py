r"""Training throughput with 1 and 2 local processes (launch/local.py), same global batch.

Runs the baseline recipe (CIFAR ResNet on synthetic 32x32 data) through
``launch/local.py`` once per layout and reads the images/s that the run itself logs
(``metrics.jsonl``), leaving out the first logged interval (compilation). Prints the
command, the machine and a markdown table. On one machine the processes share its
cores, so this measures the cost of the multi-process machinery (cross-process
all-reduce over gloo, per-process input pipelines), not a speed-up.

  python benchmarks/multiprocess_scaling.py                       # ResNet-20, batch 128
  python benchmarks/multiprocess_scaling.py --depth 8 --steps 40 --layouts 1x1 2x1 1x2 2x2
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_layout(processes: int, devices: int, args) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, os.path.join(REPO, "launch/local.py"),
               "--processes", str(processes), "--cpu_devices_per_process", str(devices), "--",
               "--config", "configs/baseline_resnet.py:smoke", "--workdir", workdir,
               f"--config.model.depth={args.depth}", f"--config.train.batch_size={args.batch}",
               f"--config.train.max_steps={args.steps}",
               f"--config.train.log_every_steps={args.log_every}",
               "--config.train.eval_every_epochs=1000",
               "--config.train.checkpoint_every_steps=100000",
               "--config.dataset.synthetic.num_train=4096"]
    t = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    with open(os.path.join(workdir, "baseline", "metrics.jsonl"), encoding="utf-8") as f:
      rates = [json.loads(line)["images_per_s"] for line in f if line.strip()]
  steady = rates[1:] or rates
  return {"images_per_s": statistics.median(steady), "wall_s": wall}


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=20)
  parser.add_argument("--batch", type=int, default=128, help="global batch size")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--log_every", type=int, default=5)
  parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1"],
                      help="PROCESSESxDEVICES_PER_PROCESS")
  args = parser.parse_args(argv)
  print("$ python " + " ".join(shlex.quote(a) for a in
                               ["benchmarks/multiprocess_scaling.py", *argv]))
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, "
        f"load {os.getloadavg()[0]:.1f}")
  print(f"\nCIFAR ResNet-{args.depth}, global batch {args.batch}, {args.steps} steps; "
        "median images/s over the logged intervals after the first")
  print("| processes x devices | images/s | vs first row | wall s (incl. start, compile) |")
  print("|---|---:|---:|---:|")
  base = None
  for layout in args.layouts:
    processes, devices = (int(v) for v in layout.split("x"))
    r = run_layout(processes, devices, args)
    base = base or r["images_per_s"]
    print(f"| {processes} x {devices} | {r['images_per_s']:.0f} | "
          f"{r['images_per_s'] / base:.2f}x | {r['wall_s']:.0f} |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
