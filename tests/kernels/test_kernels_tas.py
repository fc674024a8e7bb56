"""TAS kernels: CWI against the §3 window formula, Gumbel sampling against closed forms.

Every test draws fresh random inputs; the seed is in the failure message. Sampling
tests compare empirical frequencies with closed forms or an independent numpy Monte
Carlo (inverse-CDF draws without replacement) within 5-sigma binomial bounds.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import kernels


def _seed() -> int:
  return int.from_bytes(os.urandom(4), "little")


def _slow_cwi(x: np.ndarray, c_out: int) -> np.ndarray:
  """Independent reference: a loop of window means, in float64 (§3)."""
  c_in = x.shape[-1]
  out = []
  for i in range(c_out):
    s = int(np.floor(i * c_in / c_out))
    e = int(np.ceil((i + 1) * c_in / c_out))
    out.append(x[..., s:e].astype(np.float64).mean(axis=-1))
  return np.stack(out, axis=-1)


def _slow_cwi_matrix(c_in: int, c_out: int) -> np.ndarray:
  return _slow_cwi(np.eye(c_in), c_out)


# ----------------------------------------------------------------------------- CWI


def test_cwi_upsample_4_to_6_matches_closed_form():
  x = np.random.default_rng().normal(size=(3, 4)).astype(np.float32)
  c0, c1, c2, c3 = x.T
  want = np.stack([c0, (c0 + c1) / 2, c1, c2, (c2 + c3) / 2, c3], axis=-1)
  np.testing.assert_allclose(kernels.cwi(x, 6), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("c", [1, 5, 16])
def test_cwi_same_width_is_identity(c):
  x = np.random.default_rng().normal(size=(2, 3, c)).astype(np.float32)
  np.testing.assert_array_equal(kernels.cwi(x, c), x)
  np.testing.assert_array_equal(kernels.cwi_matrix(c, c), np.eye(c, dtype=np.float32))


# Both code paths: tiny period blocks (64->48, 64->32, 6->4, 5->1) use window sums, the
# rest the matmul.
@pytest.mark.parametrize("c_in,c_out", [(64, 48), (64, 32), (6, 4), (5, 1), (16, 9), (7, 3),
                                        (64, 63), (3, 8), (9, 16)])
def test_cwi_matches_slow_window_loop(c_in, c_out):
  x = np.random.default_rng().normal(size=(2, 3, 4, c_in)).astype(np.float32)
  np.testing.assert_allclose(kernels.cwi(x, c_out), _slow_cwi(x, c_out), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kernels.cwi_matrix(c_in, c_out), _slow_cwi_matrix(c_in, c_out),
                             rtol=1e-6)


@pytest.mark.parametrize("c_in,c_out", [(12, 5), (5, 12), (12, 8), (8, 12)])
def test_cwi_gradient_is_transpose_of_averaging_matrix(c_in, c_out):
  rng = np.random.default_rng()
  x = rng.normal(size=(6, c_in)).astype(np.float32)
  w = rng.normal(size=(6, c_out)).astype(np.float32)
  f = jax.jit(lambda x: jnp.sum(w * kernels.cwi(x, c_out)))
  grad = jax.grad(f)(x)
  np.testing.assert_allclose(grad, w @ _slow_cwi_matrix(c_in, c_out).T, rtol=1e-5, atol=1e-6)
  # Finite differences along a random direction (CWI is linear: central differences are exact
  # up to rounding).
  v = rng.normal(size=x.shape).astype(np.float32)
  eps = 1e-2
  fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
  np.testing.assert_allclose(fd, np.sum(grad * v), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_cwi_masked_one_compile_serves_every_width_pair():
  c_full = 16
  widths = (4, 6, 8, 9, 11, 12, 14, 16)  # TAS candidates of a 16-channel conv (§1)
  rng = np.random.default_rng()
  # Garbage beyond in_width must be ignored, so the buffer is fully random.
  x = rng.normal(size=(2, 3, c_full)).astype(np.float32)
  traces = []

  @jax.jit
  def masked(x, in_width, out_width):
    traces.append(1)  # Runs once per trace, not per call.
    return kernels.cwi_masked(x, in_width, out_width)

  for c_in in widths:
    for c_out in widths:
      got = np.asarray(masked(x, np.int32(c_in), np.int32(c_out)))
      np.testing.assert_allclose(got[..., :c_out], _slow_cwi(x[..., :c_in], c_out),
                                 rtol=1e-5, atol=1e-6, err_msg=f"{c_in} -> {c_out}")
      np.testing.assert_allclose(got[..., :c_out], kernels.cwi(x[..., :c_in], c_out),
                                 rtol=1e-6, atol=1e-6, err_msg=f"{c_in} -> {c_out}")
      np.testing.assert_array_equal(got[..., c_out:], 0.0)
  assert len(traces) == 1


def test_cwi_matrix_traced_blocks_match_static_matrix_under_vmap():
  c_full = 12
  rng = np.random.default_rng()
  ins = rng.integers(1, c_full + 1, size=20).astype(np.int32)
  outs = rng.integers(1, c_full + 1, size=20).astype(np.int32)
  mats = jax.jit(jax.vmap(lambda a, b: kernels.cwi_matrix_traced(a, b, c_full)))(ins, outs)
  for m, c_in, c_out in zip(np.asarray(mats), ins, outs):
    want = np.zeros((c_full, c_full))
    want[:c_in, :c_out] = _slow_cwi_matrix(int(c_in), int(c_out))
    np.testing.assert_allclose(m, want, rtol=1e-6, err_msg=f"{c_in} -> {c_out}")


def test_cwi_rejects_traced_or_nonpositive_width():
  with pytest.raises(ValueError, match="out_channels"):
    kernels.cwi(jnp.ones((2, 4)), 0)
  with pytest.raises(TypeError, match="cwi_masked"):
    jax.jit(kernels.cwi)(jnp.ones((2, 4)), 3)


# ----------------------------------------------------------------------- Gumbel-softmax


def _binomial_bound(p, n, sigmas=5.0):
  return sigmas * np.sqrt(np.maximum(p * (1 - p), 1e-12) / n) + 1e-12


def test_gumbel_softmax_sums_to_one_and_batches():
  seed = _seed()
  logits = np.random.default_rng(seed).normal(size=(3, 7)).astype(np.float32)
  p = kernels.gumbel_softmax(jax.random.key(seed), logits, 0.7)
  assert p.shape == (3, 7)
  assert np.all(np.asarray(p) >= 0)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5, err_msg=f"seed {seed}")


def test_gumbel_softmax_large_tau_is_near_uniform():
  seed = _seed()
  logits = 3 * np.random.default_rng(seed).normal(size=(1000, 5)).astype(np.float32)
  p = kernels.gumbel_softmax(jax.random.key(seed), logits, 1e5)
  np.testing.assert_allclose(p, 0.2, atol=1e-3, err_msg=f"seed {seed}")


def test_gumbel_softmax_small_tau_is_one_hot_with_softmax_argmax_frequency():
  seed, n_draws = _seed(), 100_000
  logits = np.random.default_rng(seed).normal(size=5).astype(np.float32)
  keys = jax.random.split(jax.random.key(seed), n_draws)
  p = np.asarray(jax.jit(jax.vmap(lambda k: kernels.gumbel_softmax(k, logits, 1e-4)))(keys))
  assert np.all(np.isfinite(p))
  # Not one-hot only when the top two perturbed logits are within ~tau*log(1e3) (rare).
  assert np.mean(p.max(-1) > 0.999) > 0.99, f"seed {seed}"
  freq = np.bincount(p.argmax(-1), minlength=5) / n_draws
  want = np.asarray(jax.nn.softmax(logits))  # The Gumbel-max trick.
  assert np.all(np.abs(freq - want) <= _binomial_bound(want, n_draws)), (seed, freq, want)


# ------------------------------------------------------------------------ gumbel_select


def _select_many(seed, logits, tau, n_draws, k=2):
  keys = jax.random.split(jax.random.key(seed), n_draws)
  fn = jax.jit(jax.vmap(lambda key: kernels.gumbel_select(key, logits, tau, k=k)))
  idx, w = fn(keys)
  return np.asarray(idx), np.asarray(w)


def _pair_freq(idx: np.ndarray, n: int) -> np.ndarray:
  """Ordered-pair frequencies ``[n, n]`` of draws ``idx`` ``[N, 2]``."""
  return np.bincount(idx[:, 0] * n + idx[:, 1], minlength=n * n).reshape(n, n) / len(idx)


def test_gumbel_select_indices_distinct_and_weights_normalised():
  seed = _seed()
  logits = np.random.default_rng(seed).normal(size=(6, 8)).astype(np.float32)  # 6 layers
  for k in (2, 3, 8):
    idx, w = kernels.gumbel_select(jax.random.key(seed), logits, 2.0, k=k)
    assert idx.shape == w.shape == (6, k) and idx.dtype == jnp.int32
    for row in np.asarray(idx):
      assert len(set(row.tolist())) == k, (seed, row)
    assert np.all(np.asarray(w) > 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5, err_msg=f"seed {seed}")


def _numpy_select(rng, logits, tau, n_draws):
  """Independent reference: p_hat from one Gumbel draw, then two inverse-CDF draws from
  p_hat without replacement; weights = renormalised softmax of the picked perturbed logits."""
  n = logits.shape[-1]
  log_p = logits - np.logaddexp.reduce(logits)
  pert = (log_p + rng.gumbel(size=(n_draws, n))) / tau
  p_hat = np.exp(pert - pert.max(-1, keepdims=True))
  p_hat /= p_hat.sum(-1, keepdims=True)
  rows = np.arange(n_draws)
  first = np.minimum((rng.random(n_draws)[:, None] > np.cumsum(p_hat, -1)).sum(-1), n - 1)
  rest = p_hat.copy()
  rest[rows, first] = 0.0
  rest /= rest.sum(-1, keepdims=True)
  second = np.minimum((rng.random(n_draws)[:, None] > np.cumsum(rest, -1)).sum(-1), n - 1)
  assert np.all(first != second)
  picked = np.stack([pert[rows, first], pert[rows, second]], -1)
  w = np.exp(picked - picked.max(-1, keepdims=True))
  return np.stack([first, second], -1), w / w.sum(-1, keepdims=True)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gumbel_select_pair_frequencies_match_numpy_monte_carlo(tau):
  seed, n, n_draws = _seed(), 4, 200_000
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=n).astype(np.float32)
  idx, w = _select_many(seed, logits, tau, n_draws)
  ref_idx, ref_w = _numpy_select(rng, logits.astype(np.float64), tau, n_draws)
  got, want = _pair_freq(idx, n), _pair_freq(ref_idx, n)
  pooled = (got + want) / 2
  bound = 5 * np.sqrt(2 * pooled * (1 - pooled) / n_draws) + 1e-12
  assert np.all(np.abs(got - want) <= bound), (seed, got, want)
  # Mean weight of the first draw: a CLT bound on the difference of two sample means.
  se = np.sqrt(w[:, 0].var() / n_draws + ref_w[:, 0].var() / n_draws)
  assert abs(w[:, 0].mean() - ref_w[:, 0].mean()) <= 5 * se + 1e-6, seed


@pytest.mark.parametrize("case", ["peaked", "uniform"])
def test_gumbel_select_pairs_match_without_replacement_closed_form(case):
  """Where p_hat is (nearly) deterministic, P(i then j) = q_i q_j / (1 - q_i)."""
  seed, n, n_draws = _seed(), 5, 200_000
  rng = np.random.default_rng(seed)
  if case == "peaked":
    # logits = T log q and tau = T: p_hat = softmax(log q + g / T) -> q as T grows.
    big = 1e5
    q = np.exp(rng.normal(size=n))
    q /= q.sum()
    logits, tau = (big * np.log(q)).astype(np.float32), big
  else:
    # Large tau flattens p_hat to uniform whatever the logits.
    q = np.full(n, 1 / n)
    logits, tau = rng.normal(size=n).astype(np.float32), 1e5
  idx, w = _select_many(seed, logits, tau, n_draws)
  want = q[:, None] * q[None, :] / (1 - q[:, None])
  np.fill_diagonal(want, 0.0)
  got = _pair_freq(idx, n)
  assert np.all(np.abs(got - want) <= _binomial_bound(want, n_draws)), (seed, got, want)
  # With p_hat = q the weights are q at the picks, renormalised.
  picked_q = q[idx]
  np.testing.assert_allclose(w, picked_q / picked_q.sum(-1, keepdims=True), atol=2e-3,
                             err_msg=f"seed {seed}")


def test_gumbel_select_gradient_flows_through_weights_only():
  seed = _seed()
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=8).astype(np.float32)
  c = rng.normal(size=2).astype(np.float32)
  key = jax.random.key(seed)

  def objective(logits, k=2, c=c):
    _, w = kernels.gumbel_select(key, logits, 1.5, k=k)
    return jnp.sum(c[:k] * w)

  grad = jax.jit(jax.grad(objective))(logits)
  assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0), seed
  # Central differences with the same noise: the picks stay fixed, only the weights move.
  v = rng.normal(size=8).astype(np.float32)
  eps = 1e-3
  idx_plus, _ = kernels.gumbel_select(key, logits + eps * v, 1.5)
  idx_minus, _ = kernels.gumbel_select(key, logits - eps * v, 1.5)
  if np.array_equal(idx_plus, idx_minus):  # Otherwise eps crossed a selection boundary.
    fd = (objective(logits + eps * v) - objective(logits - eps * v)) / (2 * eps)
    np.testing.assert_allclose(fd, np.dot(grad, v), rtol=2e-2, atol=2e-3, err_msg=f"seed {seed}")
  # k = 1: the weight is the constant 1, so alpha gets exactly zero gradient.
  grad_1 = jax.grad(lambda l: objective(l, k=1))(logits)
  np.testing.assert_array_equal(grad_1, 0.0)


def test_gumbel_kernels_finite_for_extreme_logits_and_small_tau():
  seed, n_draws = _seed(), 100_000
  rng = np.random.default_rng(seed)
  logits = rng.choice([-1e4, 1e4], size=5).astype(np.float32)
  logits[0], logits[1] = -1e4, 1e4  # Both extremes present.
  keys = jax.random.split(jax.random.key(seed), n_draws)

  def one(key):
    idx, w = kernels.gumbel_select(key, logits, 0.1)
    grad = jax.grad(lambda l: kernels.gumbel_select(key, l, 0.1)[1][0])(logits)
    return idx, w, grad, kernels.gumbel_softmax(key, logits, 0.1)

  idx, w, grad, p = jax.jit(jax.vmap(one))(keys)
  for name, a in (("weights", w), ("grad", grad), ("gumbel_softmax", p)):
    assert np.all(np.isfinite(np.asarray(a))), (seed, name)
  assert np.all(np.asarray(idx[:, 0]) != np.asarray(idx[:, 1])), seed
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5, err_msg=f"seed {seed}")


def test_gumbel_select_rejects_bad_k():
  with pytest.raises(ValueError, match="k=3"):
    kernels.gumbel_select(jax.random.key(0), jnp.zeros(2), 1.0, k=3)
  with pytest.raises(ValueError, match="k must be"):
    kernels.gumbel_select(jax.random.key(0), jnp.zeros(2), 1.0, k=0)
