"""The one search-space protocol (jaxprune.search.Space): the dedicated ResNet space and the
graph space answer the recipe's calls alike, and a record derives the network it prices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import sweep
from jaxprune import flops, models, search

SHAPE = (8, 8, 3)


def _spaces():
  plain = models.cifar_resnet(8, 4)
  abstract = jax.eval_shape(lambda: plain.init(jax.random.key(0), jnp.zeros((1, *SHAPE)),
                                               train=False))
  return {"resnet": search.ResNetSpace(models.tas_cifar_resnet(8, 4), SHAPE),
          "graph": search.SearchSpace(plain, abstract, SHAPE)}


@pytest.fixture(scope="module")
def spaces():
  return _spaces()


@pytest.mark.parametrize("kind", ["resnet", "graph"])
def test_record_derives_the_network_whose_counted_flops_it_states(spaces, kind):
  """For random logits, derived_from(record(arch)) is a network whose flops.count equals the
  record's argmax_flops and the traced argmax_cost (F_cost, tas.md §5)."""
  space = spaces[kind]
  assert isinstance(space, search.Space) and space.kind == kind
  seed = int(np.random.randint(1 << 30))
  _, _, arch = jax.eval_shape(space.init, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  arch = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 1, a.shape), a.dtype), arch)
  record = space.record(arch)
  model, derived = space.derived_from(record)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)),
                                               train=False))
  counted = flops.count(model, abstract, SHAPE)["flops"]
  assert counted == record["argmax_flops"] == int(round(float(space.argmax_cost(arch))))
  assert counted <= space.flops_max  # equal only when every argmax is the full width
  blocks = derived["blocks"] if kind == "resnet" else list(derived["blocks"].values())
  assert blocks == record["argmax_blocks"]


@pytest.mark.parametrize("kind", sweep(["resnet", "graph"], {"graph"}))
def test_forward_and_expected_cost_are_what_the_search_step_differentiates(spaces, kind):
  """forward gives float32 logits and the same model-state tree; E_cost has a finite,
  nonzero gradient in every width logit vector."""
  space = spaces[kind]
  key = jax.random.key(int(np.random.randint(1 << 30)))
  params, state, arch = jax.jit(space.init)(key)
  x = jax.random.normal(jax.random.fold_in(key, 1), (4, *SHAPE))
  logits, new_state = jax.jit(space.forward)(params, state, arch, x, 1.0,
                                             jax.random.fold_in(key, 2))
  assert logits.shape == (4, 4) and logits.dtype == jnp.float32
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  grads = jax.grad(space.expected_cost)(arch)["width_logits"]
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) and np.any(g != 0) for g in leaves)
