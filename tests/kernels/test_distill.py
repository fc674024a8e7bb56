"""Knowledge-distillation loss against a closed form written in numpy."""
import jax
import numpy as np

from jaxprune import distill


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_kd_loss_matches_closed_form():
  rng = np.random.default_rng()
  s, t = rng.normal(size=(2, 16, 10)) * 3
  y = rng.integers(0, 10, size=16)
  a, temp = 0.9, 4.0
  ce = -_np_log_softmax(s)[np.arange(16), y].mean()
  pt = np.exp(_np_log_softmax(t / temp))
  kl = (pt * (np.log(pt) - _np_log_softmax(s / temp))).sum(-1).mean()
  expected = (1 - a) * ce + a * temp**2 * kl
  got = jax.jit(distill.kd_loss)(s.astype(np.float32), t.astype(np.float32), y, a, temp)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_kd_loss_alpha_zero_is_cross_entropy_and_teacher_gets_no_gradient():
  rng = np.random.default_rng()
  s, t = (rng.normal(size=(2, 8, 5)) * 2).astype(np.float32)
  y = rng.integers(0, 5, size=8)
  ce = -_np_log_softmax(s.astype(np.float64))[np.arange(8), y].mean()
  np.testing.assert_allclose(distill.kd_loss(s, t, y, alpha=0.0), ce, rtol=1e-5)
  g_t = jax.grad(lambda tt: distill.kd_loss(s, tt, y))(t)
  assert np.all(np.asarray(g_t) == 0)
  # Student equal to teacher: the KL term vanishes and its gradient too.
  g_s = jax.grad(lambda ss: distill.kd_loss(ss, s, y, alpha=1.0))(s)
  np.testing.assert_allclose(g_s, 0, atol=1e-6)
