"""A parameter axis no op produces is tied to its module's input channels only when it
is the parameter's channel axis (a MAP probe's or CLS token's last axis), never a conv
kernel's spatial tap axis that happens to have the input's channel count (a 3-channel
conv before a 3x3 conv took the kernel's two 3-tap axes into its group: wrong FLOPs and
params per channel, and a rebuild that failed)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import graph, surgery

jax.config.update("jax_disable_most_optimizations", True)


class _Chain(nn.Module):
  widths: tuple
  taps: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, w in enumerate(self.widths):
      x = nn.relu(nn.Conv(w, (self.taps, self.taps), name=f"c{i}")(x))
    return nn.Dense(4, name="fc")(x.mean((1, 2)))


def _masked_reference(model, variables, x, layer, removed):
  """The original with conv `layer`'s removed output channels zero (kernel and bias):
  after the ReLU they are zero wherever the next layer reads them."""
  params = jax.tree.map(np.array, variables["params"])
  params[layer]["kernel"][..., removed] = 0
  params[layer]["bias"][removed] = 0
  return model.apply({"params": params}, x)


@pytest.mark.parametrize("taps", [3, 5])
def test_a_conv_whose_width_equals_the_next_kernels_taps(taps):
  rng = np.random.default_rng()
  widths = (taps, int(rng.integers(6, 12)), int(rng.integers(6, 12)))
  model = _Chain(widths, taps)
  variables = model.init(jax.random.key(int(rng.integers(1 << 30))), jnp.zeros((1, 8, 8, 3)))
  g = graph.trace(model, variables, (8, 8, 3))
  first = next(grp for grp in g.prunable()
               if any(m.path == "params/c0/kernel" for m in grp.members))
  assert first.width == taps
  members = {(m.path, m.axis) for m in first.members}
  assert members == {("params/c0/kernel", 3), ("params/c0/bias", 0),
                     ("params/c1/kernel", 2)}, members
  # params per channel by their definition: c0's kernel slice and bias, c1's input slice
  assert first.params_per_channel == taps * taps * 3 + 1 + taps * taps * widths[1]
  kept = np.sort(rng.choice(taps, size=taps - 1, replace=False))
  small = surgery.prune(model, variables, (8, 8, 3), {first.id: kept})
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  removed = np.setdiff1d(np.arange(taps), kept)
  want = _masked_reference(model, variables, x, "c0", removed)
  got = small.model.apply(small.variables, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
