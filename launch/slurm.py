r"""Submits one jaxprune job to a Slurm GPU cluster: one process per GPU on every node.

Writes an sbatch script that runs ``srun python -m jaxprune.main ...`` with
``JAXPRUNE_DISTRIBUTED=1``: each task calls ``jax.distributed.initialize()``, which
reads its rank, the task count, the coordinator (first node) and its GPU
(``SLURM_LOCALID``) from Slurm's environment. ``--signal=TERM@<s>`` makes Slurm
send SIGTERM before the time limit (and preemption sends it too): all processes
checkpoint at one agreed step and exit; ``--requeue`` lets a preempted job
restart, and resubmitting the same script resumes the run. The workdir must be
on storage every node sees.

  python launch/slurm.py --nodes 2 --gpus_per_node 8 --partition gpu --time 12:00:00 \
      --setup "source ~/venvs/jaxprune/bin/activate" -- \
      --config configs/tas_resnet.py:depth=56,dataset=cifar100 --workdir /shared/runs/tas56
  # Print the script only (no sbatch):
  python launch/slurm.py --nodes 2 --gpus_per_node 8 --dry_run -- --config ... --workdir ...
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def sbatch_script(args, main_args: list[str]) -> str:
  """The batch script for ``args`` (parsed launcher options)."""
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           f"#SBATCH --ntasks-per-node={args.gpus_per_node}",
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}",
           f"#SBATCH --time={args.time}",
           f"#SBATCH --signal=TERM@{args.signal_before_s}",
           "#SBATCH --requeue",
           "#SBATCH --open-mode=append",
           f"#SBATCH --output={args.output}"]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  lines += ["set -euo pipefail"]
  if args.setup:
    lines.append(args.setup)
  lines += [f"cd {common.shell_join([args.repo])}",
            "export JAXPRUNE_DISTRIBUTED=1  # jax.distributed.initialize() reads Slurm's env",
            "srun --kill-on-bad-exit=1 " + common.shell_join(common.main_command(main_args))]
  return "\n".join(lines) + "\n"


def main(argv):
  options, main_args = common.split_argv(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--cpus_per_task", type=int, default=8)
  parser.add_argument("--time", default="24:00:00")
  parser.add_argument("--partition", default="")
  parser.add_argument("--account", default="")
  parser.add_argument("--job_name", default="jaxprune")
  parser.add_argument("--output", default="jaxprune-%j.out")
  parser.add_argument("--signal_before_s", type=int, default=120,
                      help="SIGTERM this many seconds before the time limit")
  parser.add_argument("--setup", default="",
                      help="shell line run before srun, e.g. activating a virtualenv")
  parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), help="repository directory on the cluster")
  parser.add_argument("--script", default="jaxprune.sbatch",
                      help="where to write the batch script")
  parser.add_argument("--dry_run", action="store_true")
  args = parser.parse_args(options)
  if args.nodes < 1 or args.gpus_per_node < 1:
    parser.error("--nodes and --gpus_per_node must be >= 1")
  script = sbatch_script(args, main_args)
  if args.dry_run:
    print(script, end="")
    return 0
  with open(args.script, "w", encoding="utf-8") as f:
    f.write(script)
  print(f"[launch] wrote {args.script}; sbatch {args.script}", flush=True)
  return subprocess.call(["sbatch", args.script])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
