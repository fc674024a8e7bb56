"""The one jaxpr interpreter (jaxprune.graph.interpret): evaluation, liveness, ownership."""
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import graph as graph_lib
from jaxprune.graph import evaluate, interpret, tracing


@jax.custom_vjp
def _clip_grad_relu(x):
  return jnp.maximum(x, 0.0)


_clip_grad_relu.defvjp(lambda x: (_clip_grad_relu(x), x),
                       lambda x, g: (jnp.clip(g, -1, 1) * (x > 0),))


def _nested_fn(w1, w2, stack, x):
  """Every nested form the walker enters or binds: jit, remat, custom_vjp, custom_jvp
  (jax.nn.relu), scan, while, cond."""
  h = jax.jit(lambda a, b: jnp.tanh(a @ b))(x, w1)
  h = jax.checkpoint(lambda a: _clip_grad_relu(a @ w2) + a)(h)
  h = jax.nn.relu(h) - 0.1

  def layer(c, w):
    return jnp.sin(c @ w) + c, jnp.sum(c)
  h, sums = jax.lax.scan(layer, h, stack)
  k = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.9), (0, h))[1]
  out = jax.lax.cond(jnp.sum(k) > 0, lambda a: a * 2.0, lambda a: -a, k)
  return out, sums


def test_walker_evaluation_equals_eval_jaxpr_on_nested_jit_scan_remat_custom_vjp_cond():
  rng = np.random.default_rng()
  for _ in range(3):
    d = int(rng.integers(2, 6))
    args = [rng.normal(size=(d, d)).astype(np.float32),
            rng.normal(size=(d, d)).astype(np.float32),
            rng.normal(size=(int(rng.integers(1, 4)), d, d)).astype(np.float32),
            rng.normal(size=(3, d)).astype(np.float32)]
    closed = jax.make_jaxpr(_nested_fn)(*args)
    names = {e.primitive.name for e, _ in interpret.all_eqns(closed.jaxpr)}
    assert {"jit", "custom_vjp_call", "custom_jvp_call", "scan", "while", "cond"} <= names
    want = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)
    got = interpret.Interpreter().interpret(closed, args)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_walker_hook_sees_every_eqn_inside_the_calls_it_enters():
  rng = np.random.default_rng()
  args = [rng.normal(size=(3, 3)).astype(np.float32) for _ in range(2)] + [
      rng.normal(size=(2, 3, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)]
  closed = jax.make_jaxpr(_nested_fn)(*args)
  seen = []

  class Count(interpret.Interpreter):
    def equation(self, frame, i, eqn, vals, tags):
      seen.append(eqn)
      return super().equation(frame, i, eqn, vals, tags)
  Count().interpret(closed, args)

  def expected(jaxpr):  # a slow independent count: calls are entered, loops bound whole
    n = 0
    for e in jaxpr.eqns:
      n += 1
      if e.primitive.name not in ("scan", "while", "cond"):
        for key in ("jaxpr", "call_jaxpr"):
          inner = e.params.get(key)
          if inner is not None:
            n += expected(getattr(inner, "jaxpr", inner))
            break
    return n
  assert len(seen) == expected(closed.jaxpr)
  assert any(e.primitive.name == "dot_general" for e in seen)


class _Nested(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(6, (3, 3), name="stem")(x)
    x = jax.jit(jax.nn.relu)(x)
    x = nn.remat(nn.Conv)(6, (3, 3), name="c1")(x)
    x = _clip_grad_relu(x)
    return nn.Dense(4, name="head")(x.mean((1, 2)))


def test_evaluate_run_equals_the_model_and_reports_layers_inside_remat():
  rng = np.random.default_rng()
  model = _Nested()
  variables = model.init(jax.random.key(int(rng.integers(1 << 30))), jnp.zeros((1, 6, 6, 3)))
  traced = tracing.trace_jaxpr(model, variables, (6, 6, 3))
  values = {p: np.asarray(a) for p, a in graph_lib.named_leaves(model, variables).items()}
  xs = rng.normal(size=(3, 6, 6, 3)).astype(np.float32)
  result = evaluate.run(traced, values, xs)
  want = model.apply(variables, xs)
  np.testing.assert_allclose(result.outputs[0][:, 0], want, rtol=1e-5, atol=1e-5)
  assert [l.kernel for l in result.layers] == [
      "params/stem/kernel", "params/c1/kernel", "params/head/kernel"]
  assert result.followers["params/c1/kernel"] == {"bias": "params/c1/bias"}


def test_liveness_of_a_hand_built_jaxpr():
  def f(x, y):
    a = jnp.sin(x)
    jnp.cos(y)  # dead
    u, _ = jax.jit(lambda p, q: (p * 2.0, q + 1.0))(a, y)  # its second output is dead
    return u
  closed = jax.make_jaxpr(f)(jnp.ones(3), jnp.ones(3))
  jaxpr = closed.jaxpr
  flags, live = interpret.liveness(jaxpr)
  names = [e.primitive.name for e in jaxpr.eqns]
  assert names == ["sin", "cos", "jit"]
  assert flags == [True, False, True]
  x, y = jaxpr.invars
  # The jit reads only the operand its live output needs: y is not live.
  assert x in live and y not in live and jaxpr.outvars[0] in live
  inner = jaxpr.eqns[2].params["jaxpr"].jaxpr
  inner_flags, _ = interpret.liveness(inner, [True, False])
  assert inner_flags == [True, False]
  # Marking no output live leaves nothing.
  assert interpret.liveness(jaxpr, [False])[0] == [False, False, False]


def test_liveness_keeps_every_operand_of_a_loop():
  def f(x, y):
    c, _ = jax.lax.scan(lambda c, z: (c + 1.0, c * z), x, y)  # ys unused: still read
    return c
  closed = jax.make_jaxpr(f)(jnp.ones(()), jnp.ones(4))
  flags, live = interpret.liveness(closed.jaxpr)
  assert flags == [True] and set(closed.jaxpr.invars) <= live


def test_no_module_but_interpret_defines_a_nested_primitive_table():
  root = pathlib.Path(interpret.__file__).resolve().parents[1]
  # What entering a nested jaxpr needs: the params that hold bodies, the call
  # primitives' names.
  pattern = re.compile(r"""["'](call_jaxpr|fun_jaxpr|body_jaxpr|cond_jaxpr|branches|pjit|"""
                       r"""closed_call|custom_vjp_call|custom_jvp_call|remat2)["']""")
  offenders = []
  for path in sorted(root.rglob("*.py")):
    if path.name == "interpret.py" and path.parent.name == "graph":
      continue
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if pattern.search(line):
        offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
  assert pattern.search(pathlib.Path(interpret.__file__).read_text())
