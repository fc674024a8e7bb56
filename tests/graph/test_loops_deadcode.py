"""FLOPs of loops (counted per iteration, or reported as a lower bound) and of dead code
inside nested jaxprs (never counted)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import flops
from jaxprune import graph
from jaxprune.flops import LoopCountWarning


def _params(rng, d_in, d):
  k1, k2, k3 = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
  return {"w_in": jax.random.normal(k1, (d_in, d)), "w": jax.random.normal(k2, (d, d)),
          "b": jax.random.normal(k3, (d,))}


def _no_loop_warning(fn, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("error", LoopCountWarning)
    return fn(*args)


@pytest.mark.parametrize("start,stop,step", [(0, None, 1), (None, 0, -1), (None, None, 3)])
def test_fori_loop_with_constant_bounds_counts_every_iteration(start, stop, step):
  # fori_loop with jnp scalars as bounds lowers to a while over a counter (Python ints
  # give a scan); the count is trips * (d*d MACs + d bias adds), no warning, no note.
  rng = np.random.default_rng()
  d_in, d = (int(v) for v in rng.integers(2, 9, size=2))
  lo = int(rng.integers(-5, 5)) if start is None else start
  hi = int(rng.integers(-5, 12)) if stop is None else stop
  p = _params(rng, d_in, d)
  if step == 1:
    trips = max(0, hi - lo)

    def f(p, x):
      h = x @ p["w_in"]
      return jax.lax.fori_loop(jnp.int32(lo), jnp.int32(hi),
                               lambda i, h: jnp.tanh(h @ p["w"] + p["b"]), h)
  else:  # a hand-written counter: down by 1 while > hi, or up by 3 while <= hi
    if step < 0:
      lo = int(rng.integers(0, 9))
      trips = max(0, lo - hi)
      test = lambda c: c[0] > jnp.int32(hi)
    else:
      trips = len(range(lo, hi + 1, step))
      test = lambda c: c[0] <= hi

    def f(p, x):
      h = x @ p["w_in"]
      return jax.lax.while_loop(test, lambda c: (c[0] + step, jnp.tanh(c[1] @ p["w"] + p["b"])),
                                (jnp.int32(lo), h))[1]
  want = d_in * d + trips * (d * d + d)
  got = _no_loop_warning(flops.count, f, p, (d_in,))
  assert got == {"flops": want, "params": d_in * d + d * d + d}
  layers = _no_loop_warning(flops.count_layers, f, p, (d_in,))
  assert [l["note"] for l in layers] == ["", ""]
  assert _no_loop_warning(graph.trace, f, p, (d_in,)).flops == want


def test_fori_loop_with_python_int_bounds_is_a_scan_counted_exactly():
  rng = np.random.default_rng()
  d_in, d, n = (int(v) for v in rng.integers(2, 9, size=3))
  p = _params(rng, d_in, d)

  def f(p, x):
    return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ p["w"]), x @ p["w_in"])
  assert _no_loop_warning(flops.count, f, p, (d_in,))["flops"] == d_in * d + n * d * d


def test_data_dependent_while_loop_is_reported_as_a_lower_bound():
  # The trip count depends on the input: the body is counted once, the result says so
  # (exact False, a note on the loop's ops) and one warning names the loop.
  rng = np.random.default_rng()
  d_in, d = (int(v) for v in rng.integers(2, 9, size=2))
  p = _params(rng, d_in, d)

  def f(p, x):
    h = x @ p["w_in"]
    return jax.lax.while_loop(lambda h: jnp.sum(h * h) < 100.0,
                              lambda h: 2.0 * (h @ p["w"]) + 1.0, h)
  with pytest.warns(LoopCountWarning, match=r"while_loop at .*test_loops_deadcode.*lower bound"):
    got = flops.count(f, p, (d_in,))
  assert got["flops"] == d_in * d + d * d and got["exact"] is False
  assert "one iteration" in got["note"]
  with pytest.warns(LoopCountWarning):
    layers = flops.count_layers(f, p, (d_in,))
  assert layers[0]["note"] == "" and "trip count" in layers[1]["note"]
  with pytest.warns(LoopCountWarning):
    g = graph.trace(f, p, (d_in,))
  assert [op.note != "" for op in g.ops] == [False, True]
  assert "FLOPs not exact: inside the while_loop" in str(g).splitlines()[1]


def test_dead_outputs_of_nested_jits_are_not_counted():
  # inner (a jit inside a jit) returns two products and a sum; the caller keeps only the
  # first. The dead product, the dead head and the caller's product that only feeds
  # them (u) are not counted: hand count x@a, h@b, y@e (each MACs + bias adds).
  rng = np.random.default_rng()
  n, d, k, m, o = (int(v) for v in rng.integers(2, 9, size=5))
  keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 8)
  shapes = {"a": (n, d), "b": (d, k), "c": (d, m), "u": (n, m), "e": (k, o),
            "head": (m, o), "ba": (d,), "be": (o,)}
  p = {name: jax.random.normal(key, s) for (name, s), key in zip(shapes.items(), keys)}

  @jax.jit
  def deeper(p, h, u):
    return h @ p["b"], (h @ p["c"]) * u

  @jax.jit
  def inner(p, x, u):
    h = jnp.tanh(x @ p["a"] + p["ba"])
    y, z = deeper(p, h, u)
    return y, z @ p["head"], jnp.sum(y)

  def f(p, x):
    u = x @ p["u"]
    y, _, _ = inner(p, x, u)
    return jnp.tanh(y) @ p["e"] + p["be"]
  want = (n * d + d) + d * k + (k * o + o)
  got = flops.count(f, p, (n,))
  assert got == {"flops": want, "params": sum(int(np.prod(s)) for s in shapes.values())}
  assert [l["kernel"] for l in flops.count_layers(f, p, (n,))] == ["a", "b", "e"]
  g = graph.trace(f, p, (n,))
  assert g.flops == want
  (hidden,) = [grp for grp in g.groups if "a" in grp.producers]
  assert g.predict({hidden.id: [0]})["flops"] == (n + 1) + k + (k * o + o)
