"""flops.count(..., nonzero=True): the MACs of each weight's nonzero entries, against
brute-force references that run the layers on ones (the counter reads the jaxpr)."""
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from conftest import sweep
from jaxprune import flops
from jaxprune.errors import UserError
from jaxprune.methods import autoprune as ap_recipe
from jaxprune.models import dnw
from jaxprune import models, optim
from jaxprune.optim import autoprune_lib as ap

PAD = ((1, 1), (1, 1))


class SparseCNN(nn.Module):
  """A strided conv, a depthwise conv, a grouped conv without bias, a Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding=PAD, name="conv")(x))
    x = nn.Conv(8, (3, 3), padding=PAD, feature_group_count=8, name="depthwise")(x)
    x = nn.Conv(12, (3, 3), padding=PAD, feature_group_count=4, use_bias=False,
                name="grouped")(x)
    return nn.Dense(5, name="head")(jnp.mean(x, axis=(1, 2)))


# (name, stride, groups, input spatial size) of SparseCNN's convs on a 10x10 input.
CNN_CONVS = (("conv", 2, 1, 10), ("depthwise", 1, 8, 5), ("grouped", 1, 4, 5))


def _sparse(key, tree, p=0.5):
  """Every kernel of `tree` with about a fraction `p` of its entries zeroed."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(key, len(leaves))
  out = [leaf * jax.random.bernoulli(k, 1 - p, leaf.shape)
         if jax.tree_util.keystr(path).endswith("['kernel']") else leaf
         for (path, leaf), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, out)


def _conv_reference(kernel, stride, groups, size) -> int:
  """MACs on the kernel's nonzeros, by brute force: a conv of an all-ones input, padded
  with ones too (the dense convention counts padded taps), with the 0/1 kernel: each
  output entry is the number of nonzero taps it multiplies."""
  ones = jnp.ones((1, size + 2, size + 2, kernel.shape[2] * groups))
  hits = lax.conv_general_dilated(ones, (kernel != 0).astype(jnp.float32), (stride, stride),
                                  "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)
  return int(jnp.sum(hits))


def _product_reference(kernel, positions) -> int:
  """A product's MACs on the kernel's nonzeros: ones @ (kernel != 0), summed."""
  ones = jnp.ones((positions, kernel.shape[0]))
  return int(jnp.sum(ones @ (kernel != 0).astype(jnp.float32)))


def test_linen_cnn_counts_the_nonzero_taps_of_grouped_and_depthwise_convs():
  key = jax.random.key(np.random.randint(1 << 30))
  model = SparseCNN()
  variables = model.init(key, jnp.zeros((1, 10, 10, 3)))
  assert flops.count(model, variables, (10, 10, 3), nonzero=True) == \
      flops.count(model, variables, (10, 10, 3))  # dense kernels: the dense count
  params = _sparse(jax.random.fold_in(key, 1), variables["params"])
  layers = {r["name"]: r for r in flops.count_layers(model, {"params": params}, (10, 10, 3),
                                                      nonzero=True)}
  for name, stride, groups, size in CNN_CONVS:
    assert layers[name]["macs"] == _conv_reference(params[name]["kernel"], stride, groups,
                                                   size), name
  assert layers["head"]["macs"] == _product_reference(params["head"]["kernel"], 1)
  dense = flops.count_layers(model, variables, (10, 10, 3))
  assert [r["bias_adds"] for r in layers.values()] == [r["bias_adds"] for r in dense]
  total = flops.count(model, {"params": params}, (10, 10, 3), nonzero=True)["flops"]
  assert total == sum(r["macs"] + r["bias_adds"] for r in layers.values())
  assert total < sum(r["flops"] for r in dense)


class TokenMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(6, 16, rngs=rngs)
    self.down = nnx.Linear(16, 4, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


def test_nnx_mlp_over_tokens_counts_each_nonzero_once_per_token():
  seed = np.random.randint(1 << 30)
  model = TokenMLP(nnx.Rngs(seed))
  assert flops.count(model, None, (7, 6), nonzero=True) == flops.count(model, None, (7, 6))
  rng = np.random.default_rng(seed)
  for layer in (model.up, model.down):
    layer.kernel[...] = layer.kernel[...] * (rng.random(layer.kernel.shape) < 0.3)
  layers = flops.count_layers(model, None, (7, 6), nonzero=True)
  assert [r["macs"] for r in layers] == [_product_reference(model.up.kernel[...], 7),
                                         _product_reference(model.down.kernel[...], 7)]
  assert layers[0]["bias_adds"] == 7 * 16


def masked_attention(params, x):
  """A kernel masked inside the forward, then two products of activations."""
  h = x @ (params["w"] * params["mask"])
  scores = jax.nn.softmax(jnp.einsum("btd,bsd->bts", h, h))
  return jnp.einsum("bts,bsd->btd", scores, h)


def test_masked_kernel_counts_its_nonzeros_and_attention_stays_dense():
  rng = np.random.default_rng(np.random.randint(1 << 30))
  params = {"w": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
            "mask": jnp.asarray(rng.random((6, 8)) < 0.4, jnp.float32)}
  tokens = 5
  layers = flops.count_layers(masked_attention, params, (tokens, 6), batched=False,
                              nonzero=True)
  masked = params["w"] * params["mask"]
  assert [r["macs"] for r in layers] == [_product_reference(masked, tokens),
                                         tokens * tokens * 8, tokens * tokens * 8]
  dense = {**params, "mask": jnp.ones((6, 8))}
  assert flops.count(masked_attention, dense, (tokens, 6), batched=False, nonzero=True) == \
      flops.count(masked_attention, dense, (tokens, 6), batched=False)


def stacked(params, x):
  """A scan over layers whose kernels have different nonzeros."""
  h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["ws"])
  return h


def test_scan_counts_each_iteration_nonzeros():
  rng = np.random.default_rng(np.random.randint(1 << 30))
  ws = rng.normal(size=(3, 5, 5)) * (rng.random((3, 5, 5)) < rng.random((3, 1, 1)))
  params = {"ws": jnp.asarray(ws, jnp.float32)}
  counted = flops.count(stacked, params, (5,), nonzero=True)["flops"]
  assert counted == sum(_product_reference(params["ws"][i], 1) for i in range(3))
  assert flops.count(stacked, params, (5,))["flops"] == 3 * 25


def test_abstract_variables_are_refused_in_one_line():
  model = SparseCNN()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 10, 10, 3)))
  with pytest.raises(UserError, match="concrete variables") as info:
    flops.count(model, shapes, (10, 10, 3), nonzero=True)
  assert "\n" not in str(info.value)


# --- the counter's users -------------------------------------------------------------

SHAPE = (16, 16, 3)
DNW_MODELS = {
    "static": lambda g: dnw.static_graph(block_sizes=(4, 8, 8), num_outputs=6, prune_rate=0.8,
                                         graph=g),
    "discrete": lambda g: dnw.discrete_graph(nodes=10, stem_width=4, num_outputs=4,
                                             prune_rate=0.8, graph=g),
    "continuous": lambda g: dnw.continuous_graph(nodes=8, stem_width=4, num_outputs=4,
                                                 prune_rate=0.75, graph=g),
    "mobilenet": lambda g: dnw.mobilenet_graph(num_classes=10, width=0.3, graph=g,
                                               blocks=((8, 8, 1, 2), (8, 12, 2, 3))),
}


@pytest.mark.filterwarnings("ignore::jaxprune.flops.LoopCountWarning")
@pytest.mark.parametrize("kind,graph", sweep([("static", "dnw"), ("static", "random"),
                                        ("discrete", "dnw"), ("continuous", "dnw"),
                                        ("mobilenet", "dnw")], {"discrete"}))
def test_dnw_export_flops_are_the_closed_form(kind, graph):
  """dnw.md §2: (executed edges + 9 * live node ops) * spatial^2 * steps per block, plus
  the stem and classifier; dense masked: every valid slot and every node op."""
  model = DNW_MODELS[kind](graph)
  variables = model.init(jax.random.key(np.random.randint(1 << 30)), jnp.zeros((1, *SHAPE)))
  export = dnw.export_wiring(model, variables, SHAPE, with_edges=False)
  layers = sum(r["flops"] for r in flops.count_layers(model, variables, SHAPE)
               if r["kernel"] and r["kernel"].endswith("/kernel"))
  blocks = export["blocks"]
  assert export["flops_executed"] == layers + sum(
      (b["executed_edges"] + 9 * b["live_node_ops"]) * b["spatial"] ** 2 * b["steps"]
      for b in blocks)
  assert export["flops_dense_masked"] == layers + sum(
      (b["valid_slots"] + 9 * b["sources"]) * b["spatial"] ** 2 * b["steps"] for b in blocks)
  assert export["params_executed"] < export["params"]


def test_static_read_once_is_the_same_network():
  """export_wiring counts the static net's read_once form: the same logits."""
  model = DNW_MODELS["static"]("dnw")
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (2, *SHAPE))
  variables = model.init(jax.random.key(0), x)
  np.testing.assert_allclose(model.clone(read_once=True).apply(variables, x),
                             model.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_autoprune_kept_macs_are_kept_weights_at_every_position():
  model = models.get_model("lenet5", num_classes=10)
  seed = np.random.randint(1 << 30)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(seed)
  # A few weights exactly zero (an initialiser draws one in ~7% of LeNet-5 inits): an
  # open gate on a zero weight keeps nothing, in the count as in the MACs.
  params = jax.tree.map(lambda w: jnp.where(jnp.asarray(rng.random(np.shape(w)) < 0.01), 0.0, w)
                        if np.ndim(w) > 1 else w, variables["params"])
  state = optim.autoprune(0.1).init(params)
  state = state._replace(m=jax.tree.map(
      lambda m: jnp.asarray(rng.normal(size=np.shape(m)), jnp.float32) if np.ndim(m) else m,
      state.m))
  table = ap_recipe.layer_table(model, params, state, ap.DEFAULT_MASK, (28, 28, 1))
  eff = ap.effective_params(params, state)
  for name, row in table.items():  # macs / weights: the positions each weight is used at
    assert row["kept_macs"] == row["kept"] * (row["macs"] // row["weights"])
    assert row["kept"] == np.count_nonzero(np.asarray(eff[name]["kernel"]))
    assert 0 < row["kept"] < row["weights"]
