r"""The same pruned ResNet-56 in jaxprune (XLA:CPU) and in PyTorch: which speed-up per FLOPs cut?

Issue 24's FLOPs bar compares jaxprune's speed-up / FLOPs reduction with PyTorch's for the
same channels. A ratio only compares with one measured on the same machine in the same
run, so this script measures both: ResNet-56 (CIFAR, 32x32x3, 10 classes, random weights)
pruned by ``surgery.prune_to(criterion="l1", flops_ratio=--ratio)`` (local and global
ranking; ``round_to`` the library default, ``--round_to`` to fix it); every network is
also built in PyTorch from the pruned variables (same weights and padding; its output is
checked equal to the Linen network's to 1e-4 before timing), and the programs (jax base,
jax pruned, torch base, torch pruned) are timed alternately, one call of each per round
(median over at least ``--rounds`` rounds and ``--min_timing_s`` seconds). PyTorch runs
eager under ``inference_mode`` with ``--torch_threads`` threads (default 1, the issue's
setting); XLA:CPU with the flag :mod:`jaxprune.engine.runtime` picks for the model at the
batch (one process per batch, as ``pruned_speed.py``).

  pip install torch   # the CPU wheel: this benchmark's only extra dependency
  python benchmarks/pytorch_speed.py              # batch 1 and 128 (~1.5 min on 2 cores)
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from jaxprune.engine import runtime
import pruned_speed  # benchmarks/pruned_speed.py  # pylint: disable=g-bad-import-order
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order


def torch_resnet(variables):
  """A PyTorch module computing ``jaxprune.models.cifar_resnet`` (CIFAR layout, basic
  blocks) with these, possibly pruned, Linen variables: the widths are the kernels'."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn as tnn  # pylint: disable=g-import-not-at-top
  params, stats = variables["params"], variables["batch_stats"]
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy

  def conv(kernel, stride=1):
    k = np.asarray(kernel)  # HWIO
    c = tnn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], stride=stride,
                   padding=k.shape[0] // 2, bias=False)  # as resnet._conv: k // 2 each side
    c.weight.data = t(k.transpose(3, 2, 0, 1))
    return c

  def bn(p, s):
    b = tnn.BatchNorm2d(np.asarray(p["scale"]).size, eps=1e-5)
    b.weight.data, b.bias.data = t(p["scale"]), t(p["bias"])
    b.running_mean, b.running_var = t(s["mean"]), t(s["var"])
    return b

  class Block(tnn.Module):
    def __init__(self, p, s):
      super().__init__()
      stride = 2 if "shortcut_conv" in p else 1  # CIFAR layout: avg pool + 1x1 at stride 2
      self.conv_a, self.bn_a = conv(p["conv_a"]["kernel"], stride), bn(p["bn_a"], s["bn_a"])
      self.conv_b, self.bn_b = conv(p["conv_b"]["kernel"]), bn(p["bn_b"], s["bn_b"])
      self.shortcut = (tnn.Sequential(tnn.AvgPool2d(2, 2), conv(p["shortcut_conv"]["kernel"]))
                       if "shortcut_conv" in p else tnn.Identity())

    def forward(self, x):
      y = torch.relu(self.bn_a(self.conv_a(x)))
      return torch.relu(self.bn_b(self.conv_b(y)) + self.shortcut(x))

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      self.stem, self.stem_bn = conv(params["stem_conv"]["kernel"]), bn(params["stem_bn"],
                                                                        stats["stem_bn"])
      order = lambda n: tuple(int(i) for i in n[len("stage"):].split("_block"))
      names = sorted((n for n in params if n.startswith("stage")), key=order)
      self.blocks = tnn.Sequential(*[Block(params[n], stats[n]) for n in names])
      k = np.asarray(params["classifier"]["kernel"])
      self.fc = tnn.Linear(*k.shape)
      self.fc.weight.data, self.fc.bias.data = t(k.T), t(params["classifier"]["bias"])

    def forward(self, x):  # NHWC, as the Linen network's input
      x = torch.relu(self.stem_bn(self.stem(x.permute(0, 3, 1, 2))))
      return self.fc(self.blocks(x).mean(dim=(2, 3)))

  return Net().eval()


def batch_rows(args) -> list:
  """The rows of one batch (in a process of its own: the XLA flag is the rule's for it)."""
  model = pruned_speed.build("resnet56")
  profile = runtime.model_profile(model, pruned_speed.SHAPE)
  flag = runtime.configure(profile=profile, batch=args.batch)  # before the backend starts
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from jaxprune import flops, surgery  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads)
  shape = pruned_speed.SHAPE
  # Random BN statistics too: a network whose BNs are identities would hide a mismatch.
  variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, *shape)),
                                        train=False))
  rng = np.random.default_rng(0)
  variables["batch_stats"] = jax.tree.map(
      lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), variables["batch_stats"])
  base_flops = flops.count(model, variables, shape)["flops"]
  nets = {"base": (model, variables)}
  for ranking in ("local", "global"):
    small, _ = surgery.prune_to(model, variables, shape, criterion="l1",
                                flops_ratio=args.ratio, global_ranking=ranking == "global",
                                round_to=args.round_to or None)
    nets[ranking] = (small.model, jax.device_get(small.variables))
  x = np.array(jax.random.normal(jax.random.key(1), (args.batch, *shape)))  # writable
  xt = torch.from_numpy(x)
  fns = {}
  for name, (m, v) in nets.items():
    net = torch_resnet(v)
    with torch.inference_mode():
      want, got = np.asarray(m.apply(v, x, train=False)), net(xt).numpy()
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()):
      raise SystemExit(f"{name}: the PyTorch mirror differs from the Linen network by "
                       f"{np.abs(got - want).max():.2e}: not the same network, no timing")
    fns[f"jax {name}"] = pruned_speed.forward(m, v)
    fns[f"torch {name}"] = _torch_call(net)
  ms = pruned_speed.alternated_ms(fns, x, args.rounds, args.min_timing_s)
  rows = []
  for name, (m, v) in nets.items():
    if name == "base":
      continue
    f = flops.count(m, v, shape)["flops"]
    widths = [int(np.asarray(l).shape[-1]) for p, l in jax.tree_util.tree_flatten_with_path(
        v["params"])[0] if "conv" in jax.tree_util.keystr(p)]
    rows.append({"ranking": name, "batch": args.batch, "flag": bool(flag),
                 "flops_reduction": base_flops / f,
                 "jax_base_ms": ms["jax base"], "jax_ms": ms[f"jax {name}"],
                 "torch_base_ms": ms["torch base"], "torch_ms": ms[f"torch {name}"],
                 "distinct_widths": sorted(set(widths))})
  return rows


def _torch_call(net):
  import torch  # pylint: disable=g-import-not-at-top

  def call(x):
    with torch.inference_mode():
      return net(torch.from_numpy(np.asarray(x)))
  return call


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # one batch's rows
  parser.add_argument("--ratio", type=float, default=0.5, help="the FLOPs target")
  parser.add_argument("--round_to", type=int, default=0,
                      help="0: prune_to's default (the backend's, fitted to narrow groups)")
  parser.add_argument("--torch_threads", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--min_timing_s", type=float, default=pruned_speed.MIN_TIMING_S)
  args = parser.parse_args(argv)
  if args.batch:
    print(json.dumps(batch_rows(args)))
    return
  runtime.configure_malloc()
  timing.print_header([sys.argv[0], *argv])
  import torch  # pylint: disable=g-import-not-at-top
  print(f"torch {torch.__version__}, {args.torch_threads} thread(s), eager, inference_mode")
  rows = []
  for b in args.batches:
    run = subprocess.run([sys.executable, __file__, *argv, "--batch", str(b)], check=False,
                         stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if run.returncode:
      print(f"[batch {b}] failed (exit {run.returncode}); its rows are missing", flush=True)
      continue
    rows += json.loads(run.stdout.strip().splitlines()[-1])
  print()
  print("| ranking | batch | XLA:CPU conv flag | FLOPs reduction | jaxprune speed-up | "
        "jaxprune speed-up / FLOPs reduction | PyTorch speed-up | PyTorch speed-up / FLOPs "
        "reduction | base ms jax / torch | kept widths |")
  print("|---" * 10 + "|")
  for r in rows:
    sj, st = r["jax_base_ms"] / r["jax_ms"], r["torch_base_ms"] / r["torch_ms"]
    print(f"| {r['ranking']} | {r['batch']} | {'on' if r['flag'] else 'off'} | "
          f"{r['flops_reduction']:.2f}x | {sj:.2f}x | {sj / r['flops_reduction']:.2f} | "
          f"{st:.2f}x | {st / r['flops_reduction']:.2f} | {r['jax_base_ms']:.2f} / "
          f"{r['torch_base_ms']:.2f} | {r['distinct_widths']} |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
