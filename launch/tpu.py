r"""Runs one jaxprune job on a Cloud TPU VM slice: the same command on every worker.

Steps (each a ``gcloud`` command, printed with ``--dry_run``):
  1. with ``--create``: create the TPU VM (``--spot`` for preemptible capacity);
  2. copy this repository (a tarball of the working tree) to every worker;
  3. on every worker: unpack, install ``jax[tpu]`` and jaxprune, run ``--setup``;
  4. on every worker: ``JAXPRUNE_DISTRIBUTED=1 python -m jaxprune.main ...``, whose
     ``jax.distributed.initialize()`` finds the slice's workers itself.

A preempted spot slice sends SIGTERM: every worker checkpoints at one agreed step
and exits. Rerun the same command (without ``--create`` if the VM still exists,
or with it after recreating) to resume. The workdir must be storage all workers
share, e.g. a Filestore (NFS) mount, set up with ``--setup``.

  python launch/tpu.py --name my-v4-32 --zone us-central2-b --accelerator v4-32 --create \
      --setup "sudo mount -t nfs 10.0.0.2:/runs /mnt/runs" -- \
      --config configs/tas_resnet.py:depth=56,dataset=cifar100 --workdir /mnt/runs/tas56
  python launch/tpu.py --name my-v4-32 --zone us-central2-b --dry_run -- --config ... --workdir ...
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

TARBALL = "jaxprune-src.tar.gz"


def commands(args, main_args: list[str]) -> list[list[str]]:
  """The commands of a launch, in order (argv lists)."""
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  local_tar = os.path.join(args.tmp_dir, TARBALL)
  out = []
  if args.create:
    out.append([*tpu, "create", args.name, *where, f"--accelerator-type={args.accelerator}",
                f"--version={args.version}", *(["--spot"] if args.spot else [])])
  out.append(["tar", "czf", local_tar, "--exclude=.git", "--exclude=workdirs",
              "-C", args.repo, "."])
  out.append([*tpu, "scp", local_tar, f"{args.name}:~/{TARBALL}", *where, "--worker=all"])
  install = (f"mkdir -p ~/jaxprune && tar xzf ~/{TARBALL} -C ~/jaxprune && "
             f"pip install -q -U {common.shell_join([args.jax_package])} && "
             "pip install -q -e ~/jaxprune")
  if args.setup:
    install += f" && {args.setup}"
  out.append([*tpu, "ssh", args.name, *where, "--worker=all", f"--command={install}"])
  run = ("cd ~/jaxprune && JAXPRUNE_DISTRIBUTED=1 " +
         common.shell_join(common.main_command(main_args)))
  out.append([*tpu, "ssh", args.name, *where, "--worker=all", f"--command={run}"])
  return out


def main(argv):
  options, main_args = common.split_argv(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="")
  parser.add_argument("--create", action="store_true", help="create the TPU VM first")
  parser.add_argument("--accelerator", default="v4-8", help="e.g. v4-32, v5litepod-16")
  parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime")
  parser.add_argument("--spot", action="store_true", help="preemptible (spot) capacity")
  parser.add_argument("--jax_package", default="jax[tpu]")
  parser.add_argument("--setup", default="",
                      help="shell line run on every worker after installing")
  parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), help="local repository to copy")
  parser.add_argument("--tmp_dir", default="/tmp")
  parser.add_argument("--dry_run", action="store_true")
  args = parser.parse_args(options)
  for command in commands(args, main_args):
    print("$ " + common.shell_join(command), flush=True)
    if not args.dry_run:
      code = subprocess.call(command)
      if code:
        return code
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
