"""search.SearchSpace's probe is surgery's (rebuild.probe_inputs), also for pytree inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import search
from jaxprune.graph import tracing
from jaxprune.surgery.rebuild import probe_inputs

L, V, D = 5, 7, 8


class _Block(nn.Module):

  @nn.compact
  def __call__(self, h):
    return h + nn.Dense(D, name="fc2")(nn.relu(nn.Dense(2 * D, name="fc1")(h)))


class _Tagger(nn.Module):
  """Token ids and a float mask in, three residual MLP blocks (a depth stage)."""

  @nn.compact
  def __call__(self, ids, mask, train: bool = False):
    del train
    h = nn.Embed(V, D, name="embed")(ids) * mask[..., None]
    for i in range(3):
      h = _Block(name=f"block{i}")(h)
    return nn.Dense(3, name="head")(h.mean(1))


def test_search_space_probe_on_a_pytree_input_is_surgerys_and_checks_depth():
  # The depth check runs the model with its blocks skipped on the probe: with token ids
  # and a mask, the probe keeps each input's dtype (ids in range of the 7-row table) and
  # the stage of three residual blocks is found and passes it.
  rng = np.random.default_rng()
  shapes = {"ids": jax.ShapeDtypeStruct((L,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((L,), jnp.float32)}
  model = _Tagger()
  variables = model.init(jax.random.key(int(rng.integers(1 << 30))),
                         jnp.zeros((1, L), jnp.int32), jnp.ones((1, L)))
  call = lambda v, x: model.apply(v, x["ids"], x["mask"])
  space = search.SearchSpace(model, variables, shapes, call)
  assert space.depth_names == ["block0..block2"] and space.depth_candidates == [(1, 2, 3)]
  seed = int(rng.integers(1 << 30))
  probe = space._example(np.random.default_rng(seed))  # pylint: disable=protected-access
  want = probe_inputs(shapes, 1, seed=int(np.random.default_rng(seed).integers(1 << 31)))
  assert jax.tree.structure(probe) == jax.tree.structure(tracing.example_inputs(shapes))
  jax.tree.map(np.testing.assert_array_equal, probe, want)
  assert probe["ids"].dtype == jnp.int32 and probe["ids"].shape == (1, L)
  assert set(np.unique(probe["ids"]).tolist()) <= {0, 1}
  assert probe["mask"].dtype == jnp.float32 and np.all(probe["mask"] != 0)
  zeros = space._example()  # pylint: disable=protected-access
  assert all(not np.any(a) for a in jax.tree.leaves(zeros))
