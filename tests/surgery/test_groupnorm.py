"""GroupNorm channels are pruned in whole norm groups (issue 22).

GroupNorm reshapes the channels to (groups, channels per group) and takes its
statistics over each group: a group's channels are one channel of the graph, removed
together, and the rebuild lowers ``num_groups``. The kept groups' statistics then run
over the same channels as before, so the removal is exact: the pruned network gives the
masked original's logits (every removed slice zeroed) to float32 rounding. Tested in
Linen and NNX on fresh random draws of the kept groups and the inputs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import masking
from jaxprune import flops, graph, surgery

TOL = dict(rtol=2e-5, atol=2e-5)
HW, C_IN, WIDTHS, GROUPS = 6, 3, (12, 8), (4, 2)


class LinenGN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i, (w, g) in enumerate(zip(WIDTHS, GROUPS)):
      x = nn.Conv(w, (3, 3), name=f"conv{i}")(x)
      x = nn.relu(nn.GroupNorm(g, name=f"gn{i}")(x))
    return nn.Dense(3, name="head")(x.mean((1, 2)))


class NNXGN(nnx.Module):
  def __init__(self, rngs):
    ins = (C_IN,) + WIDTHS[:-1]
    self.convs = nnx.List([nnx.Conv(i, w, (3, 3), rngs=rngs) for i, w in zip(ins, WIDTHS)])
    self.gns = nnx.List([nnx.GroupNorm(w, num_groups=g, rngs=rngs)
                         for w, g in zip(WIDTHS, GROUPS)])
    self.head = nnx.Linear(WIDTHS[-1], 3, rngs=rngs)

  def __call__(self, x):
    for conv, gn in zip(self.convs, self.gns):
      x = nnx.relu(gn(conv(x)))
    return self.head(x.mean((1, 2)))


def _build(api, seed):
  if api == "linen":
    model = LinenGN()
    return model, model.init(jax.random.key(seed), jnp.zeros((1, HW, HW, C_IN)))
  model = NNXGN(nnx.Rngs(seed))
  for gn in model.gns:  # GroupNorm starts at scale 1, bias 0: make them matter
    gn.scale[...] = jax.random.uniform(jax.random.key(seed + 1), gn.scale[...].shape) + 0.5
    gn.bias[...] = jax.random.normal(jax.random.key(seed + 2), gn.bias[...].shape)
  return model, None


def _apply(model, variables, x):
  return model(x) if variables is None else model.apply(variables, x)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_groupnorm_groups_are_removed_whole_and_give_the_masked_originals_logits(api):
  rng = np.random.default_rng()
  model, variables = _build(api, int(rng.integers(1 << 20)))
  g = graph.trace(model, variables, (HW, HW, C_IN))
  for w, n in zip(WIDTHS, GROUPS):  # one channel of the graph per norm group
    (grp,) = [grp for grp in g.groups if grp.width == n and grp.prunable]
    assert grp.exactness == "exact" and not grp.effects, str(grp)
    for m in grp.members:  # channel c: the c-th block of w // n channels
      np.testing.assert_array_equal(m.index, np.arange(w).reshape(n, w // n))
  keep = {grp.id: np.sort(rng.choice(grp.width, int(rng.integers(1, grp.width)),
                                     replace=False))
          for grp in g.prunable()}
  masked_model, masked_vars = masking.masked(model, variables, g, keep)
  small = surgery.prune(masked_model, masked_vars, (HW, HW, C_IN), keep, graph=g)
  assert small.approximate == {}
  assert flops.count(small.model, small.variables, (HW, HW, C_IN)) == g.predict(keep)
  if api == "nnx":
    assert [gn.num_groups for gn in small.model.gns] == [len(k) for k in keep.values()]
  x = jnp.asarray(rng.normal(size=(2, HW, HW, C_IN)), jnp.float32)
  want = _apply(masked_model, masked_vars, x)
  np.testing.assert_allclose(_apply(small.model, small.variables, x), want, **TOL)
  assert not np.allclose(_apply(model, variables, x), want, **TOL)  # the mask mattered


def test_the_width_search_says_why_it_leaves_out_groupnorm_groups():
  """TAS's width mix acts on single output channels: a group whose channels are whole
  norm groups is excluded with that reason (it was 'does not put the group's channels
  on its output's last axis', which was not the cause)."""
  from jaxprune import search  # pylint: disable=g-import-not-at-top
  from jaxprune.errors import UserError  # pylint: disable=g-import-not-at-top
  model, variables = _build("linen", int(np.random.default_rng().integers(1 << 30)))
  with pytest.raises(UserError) as e:
    search.SearchSpace(model, variables, (HW, HW, C_IN), num_picks=2)
  for width, groups in zip(WIDTHS, GROUPS):
    assert f"spans {width // groups} of its output channels" in str(e.value)
