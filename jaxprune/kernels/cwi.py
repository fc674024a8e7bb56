"""Channel-wise interpolation (CWI) of TAS (docs/methods/tas.md §3), channels last.

Static widths (``cwi``) or traced widths in a full-width buffer (``cwi_masked``), never a
recompile per sampled width; notes: docs/design/kernels.md.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cwi", "cwi_masked", "cwi_matrix", "cwi_matrix_traced"]

# Largest period block (a*b, see ``cwi``) computed as explicit window sums. Measured on
# XLA:CPU, fwd+bwd at (128, 32, 32, C): 64->48 (a*b=12) sums 1.5-3x faster than the GEMM,
# 64->24 (a*b=24) the GEMM 2x faster.
_MAX_WINDOW_BLOCK = 12


def _float_dtype(dtype):
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def cwi_matrix(c_in: int, c_out: int, dtype=np.float32) -> np.ndarray:
  """Returns the static CWI averaging matrix ``[c_in, c_out]``.

  ``x @ cwi_matrix(C, C')`` is ``CWI(x -> C')`` for ``x`` of shape ``[..., C]``.
  Column ``i`` holds ``1 / (e - s)`` on rows ``s..e-1`` and zeros elsewhere.

  Args:
    c_in: number of input channels ``C >= 1`` (Python int).
    c_out: number of output channels ``C' >= 1`` (Python int).
    dtype: numpy dtype of the result.

  Returns:
    ``[c_in, c_out]`` numpy array; the identity when ``c_in == c_out``.
  """
  c_in, c_out = _check_static_width(c_in, "c_in"), _check_static_width(c_out, "c_out")
  m = np.zeros((c_in, c_out), dtype=np.float64)
  for i in range(c_out):
    # §3: s = floor(i*C/C'), e = ceil((i+1)*C/C'), in exact integer arithmetic.
    s, e = (i * c_in) // c_out, -((-(i + 1) * c_in) // c_out)
    m[s:e, i] = 1.0 / (e - s)
  return m.astype(dtype)


def _check_static_width(width, name: str) -> int:
  if isinstance(width, (bool, np.bool_)) or not isinstance(width, (int, np.integer)):
    raise TypeError(f"CWI: {name} must be a static Python int, got {width!r}; "
                    "for widths traced under jit use cwi_masked")
  if width < 1:
    raise ValueError(f"CWI: {name} must be >= 1, got {width}")
  return int(width)


def cwi(x: jax.Array, out_channels: int, *, precision=None) -> jax.Array:
  """Channel-wise interpolation of the last axis to ``out_channels`` channels.

  With ``g = gcd(C, C')``, ``C = g*a`` and ``C' = g*b``, the windows repeat every
  ``a`` inputs and ``b`` outputs and never cross a period (the matrix is
  block-diagonal with ``g`` copies of ``cwi_matrix(a, b)``). When that block is
  tiny (``a*b <= 12``, e.g. 64 -> 48 or 2:1 pooling) the output is computed as
  explicit window means, one fused memory-bound pass that is also exact on
  backends whose default matmul precision is reduced; otherwise as one matmul
  by ``cwi_matrix(C, C')``.

  Args:
    x: ``[..., C]`` float array, channels last, ``C`` static.
    out_channels: ``C' >= 1``, a static Python int. ``C' < C`` pools windows,
      ``C' > C`` repeats/overlaps them (4 -> 6 gives
      ``[c0, (c0+c1)/2, c1, c2, (c2+c3)/2, c3]``), ``C' == C`` is the identity.
    precision: passed to ``jnp.matmul`` on the matmul path (e.g.
      ``jax.lax.Precision.HIGHEST`` for exact float32 means on accelerators whose
      default is reduced precision).

  Returns:
    ``[..., C']`` array of ``x``'s (floating) dtype.
  """
  x = jnp.asarray(x)
  x = x.astype(_float_dtype(x.dtype))
  c_in = x.shape[-1]
  out_channels = _check_static_width(out_channels, "out_channels")
  if out_channels == c_in:
    return x
  g = math.gcd(c_in, out_channels)
  a, b = c_in // g, out_channels // g
  if a * b <= _MAX_WINDOW_BLOCK:
    return _window_means(x, g, a, b)
  return jnp.matmul(x, jnp.asarray(cwi_matrix(c_in, out_channels, x.dtype)),
                    precision=precision)


def _window_means(x: jax.Array, g: int, a: int, b: int) -> jax.Array:
  """CWI ``[..., g*a] -> [..., g*b]`` as explicit window means within each period."""
  periods = x.reshape(x.shape[:-1] + (g, a))
  outs = []
  for r in range(b):
    # §3 windows of the (a -> b) block: s = floor(r*a/b), e = ceil((r+1)*a/b).
    s, e = (r * a) // b, -((-(r + 1) * a) // b)
    window = [periods[..., j] for j in range(s, e)]
    outs.append(sum(window[1:], window[0]) / (e - s))
  return jnp.stack(outs, axis=-1).reshape(x.shape[:-1] + (g * b,))


def cwi_matrix_traced(in_width, out_width, c_full: int, dtype=jnp.float32) -> jax.Array:
  """Returns the CWI matrix for traced widths inside a static full-width buffer.

  Entry ``[c, i]`` is ``1 / (e_i - s_i)`` when ``i < out_width`` and
  ``s_i <= c < e_i`` (windows of §3 over the first ``in_width`` channels), else
  0. Rows ``c >= in_width`` are all zero, so whatever sits in the buffer beyond
  ``in_width`` is ignored. Build it once per sampled pair and reuse it for every
  tensor that needs the same interpolation (``y = x @ m``).

  Args:
    in_width: int32 scalar (may be traced), ``1 <= in_width <= c_full``.
    out_width: int32 scalar (may be traced), ``1 <= out_width <= c_full``.
    c_full: static Python int, the buffer's channel count.
    dtype: dtype of the result.

  Returns:
    ``[c_full, c_full]`` array; its top-left ``[in_width, out_width]`` block
    equals ``cwi_matrix(in_width, out_width)``.
  """
  c_full = _check_static_width(c_full, "c_full")
  c_in = jnp.asarray(in_width, jnp.int32)
  c_out = jnp.maximum(jnp.asarray(out_width, jnp.int32), 1)  # No 0-division if misused.
  row = jax.lax.broadcasted_iota(jnp.int32, (c_full, c_full), 0)  # input channel c
  col = jax.lax.broadcasted_iota(jnp.int32, (c_full, c_full), 1)  # output channel i
  # §3 windows with integer floor/ceil: s = (i*C)//C', e = ((i+1)*C + C' - 1)//C'.
  start = (col * c_in) // c_out
  end = ((col + 1) * c_in + c_out - 1) // c_out
  inside = (row >= start) & (row < end) & (col < c_out)
  size = jnp.maximum(end - start, 1).astype(dtype)
  return jnp.where(inside, 1 / size, jnp.zeros((), dtype))


def cwi_masked(x: jax.Array, in_width, out_width, *, precision=None) -> jax.Array:
  """CWI with traced widths on a static full-width channel buffer.

  The form the TAS search step needs (docs/methods/tas.md §4): one compiled function
  serves every sampled ``(in_width, out_width)`` pair, with no recompilation
  and no Python branching on the widths.

  Args:
    x: ``[..., C_full]`` float array; only the first ``in_width`` channels are
      read (the rest may hold anything).
    in_width: int32 scalar (may be traced), ``1 <= in_width <= C_full``.
    out_width: int32 scalar (may be traced), ``1 <= out_width <= C_full``.
    precision: passed to ``jnp.matmul``.

  Returns:
    ``[..., C_full]`` array: the first ``out_width`` channels hold
    ``CWI(x[..., :in_width] -> out_width)``, the rest are zero. To reuse one
    interpolation for several tensors, build ``cwi_matrix_traced`` once and
    compute ``x @ m``.
  """
  x = jnp.asarray(x)
  x = x.astype(_float_dtype(x.dtype))
  m = cwi_matrix_traced(in_width, out_width, x.shape[-1], x.dtype)
  return jnp.matmul(x, m, precision=precision)
