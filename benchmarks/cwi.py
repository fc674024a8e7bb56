r"""Speed of channel-wise interpolation (docs/methods/tas.md §3): forward + backward, jitted.

Times, on the default backend, ``jaxprune.kernels.cwi`` (static widths; window
sums or one ``[C, C']`` matmul, whichever its rule picks), the plain matmul by
``kernels.cwi_matrix``, ``kernels.cwi_masked`` (traced widths on a full-width
buffer, one ``[C_full, C_full]`` matmul; the form the search step uses), a naive
reference (a Python loop of window means, jitted) and, as the floor set by memory
traffic and fresh output buffers, a plain slice ``x[..., :C']`` (forward) whose
backward is a pad. Each row is
the median over ``--repeats`` calls of one jitted function returning the output
and the input gradient for a random cotangent (``jax.vjp``), after
``block_until_ready``. Prints the command, the machine and a markdown table.

Anchor: the official PyTorch CWI, forward + backward on (128, 64, 32, 32) -> 48
channels, takes 54 ms on the reference machine; jaxprune aims at <= 10.8 ms.

The benchmark applies the training program's process settings
(``jaxprune.engine.runtime.configure``: XLA flags and glibc allocator
thresholds), as ``python -m jaxprune.main`` does. Without the allocator setting,
most of the time of a memory-bound kernel this size is page faults on fresh
~30 MB output buffers (glibc serves them with mmap and unmaps them on free);
``JAXPRUNE_MALLOC_TUNING=0 python benchmarks/cwi.py`` shows that cost.

  python benchmarks/cwi.py                         # (128, 32, 32, 64) -> 48
  python benchmarks/cwi.py --shape 64 32 32 64 --out 32 --repeats 50
"""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import kernels
from jaxprune.engine import runtime
import timing  # benchmarks/timing.py, next to this script

runtime.configure()  # Before JAX starts its backend: the program's own settings.


def naive_cwi(x, out_channels):
  """Reference: one mean per output window (§3), a Python loop traced into the graph."""
  c_in = x.shape[-1]
  outs = []
  for i in range(out_channels):
    s, e = (i * c_in) // out_channels, -((-(i + 1) * c_in) // out_channels)
    outs.append(jnp.mean(x[..., s:e], axis=-1))
  return jnp.stack(outs, axis=-1)


def _forward_backward(fn):
  """Jitted ``(x, ct, *widths) -> (fn(x, *widths), d<ct, fn(x)>/dx)``."""

  def run(x, ct, *widths):
    y, vjp = jax.vjp(lambda x: fn(x, *widths), x)
    return y, vjp(ct)[0]

  return jax.jit(run)


def _median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  return timing.median_ms(lambda: jax.block_until_ready(fn(*args)), repeats, warmup=True)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs=4, default=[128, 32, 32, 64],
                      help="input N H W C (channels last)")
  parser.add_argument("--out", type=int, default=48, help="output channels C'")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--anchor-ms", type=float, default=54.0,
                      help="official PyTorch CWI fwd+bwd time to compare with")
  args = parser.parse_args(argv)
  timing.print_header(["benchmarks/cwi.py", *argv])

  n, h, w, c = args.shape
  c_out = args.out
  kx, kc, km = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (n, h, w, c), jnp.float32)
  ct = jax.random.normal(kc, (n, h, w, c_out), jnp.float32)
  ct_full = jax.random.normal(km, (n, h, w, c), jnp.float32)
  widths = (np.int32(c), np.int32(c_out))

  static = _forward_backward(lambda x: kernels.cwi(x, c_out))
  matrix = jnp.asarray(kernels.cwi_matrix(c, c_out))
  matmul = _forward_backward(lambda x: x @ matrix)
  floor = _forward_backward(lambda x: x[..., :c_out])
  masked = _forward_backward(kernels.cwi_masked)
  naive = _forward_backward(lambda x: naive_cwi(x, c_out))
  # Same numbers from all three before timing anything.
  y_s, g_s = static(x, ct)
  y_n, g_n = naive(x, ct)
  y_m, _ = masked(x, ct_full, *widths)
  np.testing.assert_allclose(y_s, y_n, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_s, g_n, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(y_m[..., :c_out], y_s, rtol=1e-4, atol=1e-5)

  np.testing.assert_allclose(matmul(x, ct)[0], y_s, rtol=1e-4, atol=1e-5)

  rows = [
      ("kernels.cwi (static)", _median_ms(static, (x, ct), args.repeats)),
      (f"x @ kernels.cwi_matrix({c}, {c_out}) (static matmul)",
       _median_ms(matmul, (x, ct), args.repeats)),
      (f"kernels.cwi_masked (traced {c}->{c_out} in buffer {c})",
       _median_ms(masked, (x, ct_full, *widths), args.repeats)),
      ("naive loop of window means (jit)", _median_ms(naive, (x, ct), args.repeats)),
      (f"floor: slice x[..., :{c_out}] (no arithmetic)", _median_ms(floor, (x, ct), args.repeats)),
  ]
  print(f"\nCWI forward+backward, x {tuple(args.shape)} float32 -> {c_out} channels, "
        f"median of {args.repeats}")
  print(f"| implementation | ms | speed-up vs PyTorch anchor ({args.anchor_ms:g} ms) |")
  print("|---|---:|---:|")
  for name, ms in rows:
    print(f"| {name} | {ms:.2f} | {args.anchor_ms / ms:.2f}x |")


if __name__ == "__main__":
  main(sys.argv[1:])
