"""DNW: the top-k straight-through kernel, the neural graphs, export and the recipe."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config

from jaxprune import flops, kernels, models
from jaxprune.errors import UserError
from jaxprune.methods import dnw as dnw_method
from jaxprune.models import dnw

# A small static DAG: layers of 4, 8, 8 nodes, 4 output nodes, 16x16 inputs (4x4 graph).
SMALL = dict(block_sizes=(4, 8, 8), num_outputs=4, prune_rate=0.75)
SMALL_SHAPE = (16, 16, 3)


def _reference_topk(w, k, valid=None):
  """Independent slow reference: stable sort by -|w| (ties by flat index), first k."""
  flat = np.abs(np.asarray(w, np.float64)).ravel()
  candidates = np.arange(flat.size) if valid is None else np.nonzero(np.ravel(valid))[0]
  order = candidates[np.argsort(-flat[candidates], kind="stable")]
  mask = np.zeros(flat.size, bool)
  mask[order[:k]] = True
  return mask.reshape(np.shape(w))


@pytest.mark.parametrize("shape,prune_rate", [((37,), 0.3), ((64, 48), 0.95),
                                              ((5, 7, 3), 0.0), ((20, 20), 1.0),
                                              ((800, 80), 0.775)])
def test_topk_ste_keeps_exact_count_of_largest(shape, prune_rate):
  w = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), shape)
  out = np.asarray(jax.jit(lambda w: kernels.topk_ste(w, prune_rate))(w))
  numel = int(np.prod(shape))
  kept = out != 0
  assert kept.sum() == numel - int(prune_rate * numel)
  np.testing.assert_array_equal(kept, _reference_topk(w, kept.sum()))
  np.testing.assert_array_equal(out[kept], np.asarray(w)[kept])  # kept values exact


def test_topk_ties_keep_lowest_flat_index():
  rng = np.random.default_rng()
  w = rng.integers(-3, 4, size=(30, 17)).astype(np.float32)  # many ties, signed zeros
  w[rng.random(w.shape) < 0.1] = -0.0
  for k in (0, 1, 50, 255, w.size):
    mask = np.asarray(kernels.topk_mask(jnp.asarray(w), k))
    assert mask.sum() == k
    np.testing.assert_array_equal(mask, _reference_topk(w, k))


def test_topk_valid_restricts_candidates_and_traced_k():
  rng = np.random.default_rng()
  w = rng.normal(size=(40, 30)).astype(np.float32)
  valid = rng.random(w.shape) < 0.3
  k = int(valid.sum()) // 3
  mask = np.asarray(jax.jit(lambda w, k: kernels.topk_mask(w, k, valid))(w, k))
  np.testing.assert_array_equal(mask, _reference_topk(w, k, valid))
  with pytest.raises(ValueError, match="k="):
    kernels.topk_mask(jnp.asarray(w), int(valid.sum()) + 1, valid)


def test_topk_ste_backward_is_identity():
  w = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (50, 20))
  cotangent = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), w.shape)
  _, vjp = jax.vjp(lambda w: kernels.topk_ste(w, 0.9), w)
  np.testing.assert_array_equal(vjp(cotangent)[0], cotangent)


def test_hallucinated_edge_gets_gradient_and_swaps_in():
  # Edge 0 is real (|1.0|), edge 1 hallucinated (|0.1|). The loss wants output from
  # input 1, which only the hallucinated edge carries: dnw.md §1's <Z_u, dL/dI_v>.
  w = jnp.array([1.0, 0.1])
  x = jnp.array([0.0, 1.0])
  loss = lambda w: (x @ kernels.topk_ste(w, 0.5) - 5.0) ** 2
  grad = jax.grad(loss)(w)
  assert grad[1] == pytest.approx(2 * (0.0 - 5.0) * 1.0)  # flows to the pruned edge
  assert grad[0] == 0.0  # its input is zero
  w = w - 0.2 * grad
  np.testing.assert_array_equal(kernels.topk_mask(w, 1), [False, True])  # swapped in
  assert loss(w) < (0.0 - 5.0) ** 2


def test_static_graph_hallucinated_edges_receive_gradients():
  model = dnw.static_graph(**SMALL)
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (4, *SMALL_SHAPE))
  variables = model.init(jax.random.key(0), x[:1])
  labels = jnp.arange(4) % 10

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jax.nn.log_softmax(logits)[jnp.arange(4), labels].mean()

  grad = np.asarray(jax.jit(jax.grad(loss))(variables["params"])["graph"]["edges"])
  block = model.graph_blocks(SMALL_SHAPE)[0]
  real = np.asarray(kernels.topk_mask(variables["params"]["graph"]["edges"], block["k"],
                                      block["valid"]))
  hallucinated = block["valid"] & ~real
  assert hallucinated.sum() > 0
  assert np.count_nonzero(grad[hallucinated]) > 0.9 * hallucinated.sum()
  assert np.all(grad[~block["valid"]] == 0)  # slots outside the DAG are never read


def test_tiny_static_graph_keeps_32000_edges_of_its_dag():
  model = dnw.static_graph()
  block = model.graph_blocks((32, 32, 3))[0]
  assert block["k"] == 32_000
  w = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (800, 800))
  mask = np.asarray(kernels.topk_mask(w, block["k"], block["valid"]))
  assert mask.sum() == 32_000 and not (mask & ~block["valid"]).any()
  # Layer i (sizes 32, 192, 192, 192, 192) feeds every later node; the last layer the
  # 100 output nodes: 32*768 + 192*(576 + 384 + 192 + 100) slots.
  assert block["valid"].sum() == 32 * 768 + 192 * (576 + 384 + 192 + 100)
  assert dnw.discrete_graph().graph_blocks((32, 32, 3))[0]["k"] == 32_000


def test_static_prune_rate_beyond_the_dag_is_one_line_before_any_work(tmp_path):
  rng = np.random.default_rng()
  sizes = tuple(int(n) for n in rng.integers(2, 9, size=3))
  nodes, outputs = sum(sizes), int(rng.integers(1, sizes[-1] + 1))
  slots = int(dnw.StaticGraphNet(block_sizes=sizes, num_outputs=outputs).valid_slots().sum())
  too_low = (1 - slots / nodes ** 2) * rng.uniform(0.2, 0.9)
  with pytest.raises(UserError, match=f"only {slots} slots") as info:
    dnw.StaticGraphNet(block_sizes=sizes, num_outputs=outputs, prune_rate=too_low).edge_count()
  advised = float(str(info.value).rsplit(">= ", 1)[1].rstrip("."))
  model = dnw.StaticGraphNet(block_sizes=sizes, num_outputs=outputs, prune_rate=advised)
  assert slots - nodes ** 2 * 1e-4 <= model.edge_count() <= slots  # the advice works
  x = jnp.zeros((1, 16, 16, 3))
  assert np.isfinite(model.apply(model.init(jax.random.key(0), x), x)).all()
  with pytest.raises(UserError, match=f"num_edges <= {slots}"):
    dnw.StaticGraphNet(block_sizes=sizes, num_outputs=outputs, num_edges=slots + 1).edge_count()
  # The recipe refuses it before the workdir is touched.
  config = load_config("configs/dnw_cifar.py", "smoke", {"model.prune_rate": 0.3})
  with pytest.raises(UserError, match="use prune_rate >= 0.5861"):
    dnw_method.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["dnw_static", "dnw_discrete", "dnw_continuous"])
def test_prune_rate_outside_what_keeps_an_edge_is_one_line(name):
  rng = np.random.default_rng()
  for rate in (1.0, 1 + rng.uniform(0.01, 1), -rng.uniform(0.01, 1)):
    with pytest.raises(UserError, match=f"{name}: prune_rate={rate} must lie in"):
      models.get_model(name, 10, prune_rate=rate).graph_blocks((32, 32, 3))
  rate = rng.uniform(0.6, 0.99)  # in range: k edges of the 800 x 800 slots
  assert models.get_model(name, 10, prune_rate=rate).edge_count() == 640_000 - int(rate * 640_000)


def test_mobilenet_width_outside_0_1_is_one_line_in_forward_and_flops():
  x = jnp.zeros((1, 32, 32, 3))
  for width in (0.0, -np.random.uniform(0.01, 1), 1 + np.random.uniform(0.01, 4)):
    model = models.get_model("dnw_mobilenet", 10, width=width)
    for call in (lambda: model.graph_blocks((32, 32, 3)),
                 lambda: model.init(jax.random.key(0), x)):
      with pytest.raises(UserError, match=f"dnw_mobilenet: width={width} must lie in"):
        call()


def test_mobilenet_block_prune_rates_follow_reference_formula_x0225():
  model = dnw.mobilenet_graph(width=0.225)
  for (inp, out, _, n), block in zip(dnw.MOBILENET_BLOCKS, model.graph_blocks((224, 224, 3))):
    numel = (inp + out * (n - 1)) * out * n
    edges = (inp * out + (n - 1) * out ** 2) * 0.225 ** 2  # dnw.md §2
    rate = 1 - edges / numel
    assert dnw.mobilenet_prune_rate(inp, out, n, 0.225) == pytest.approx(rate, rel=1e-12)
    assert block["k"] == numel - int(rate * numel)
    assert abs(block["k"] - edges) <= 1
    assert block["valid"].shape == (inp + out * (n - 1), out * n)
    assert block["k"] <= block["valid"].sum()
  assert [b["spatial"] for b in model.graph_blocks((224, 224, 3))] == [112, 56, 28, 14, 7]


def test_continuous_time_solver_tolerance_is_honoured(monkeypatch):
  rng = np.random.default_rng()
  nodes = 3
  z0 = jnp.asarray(rng.normal(size=(1, 3, 3, nodes)), jnp.float32)
  args = (jnp.asarray(rng.normal(size=(nodes, nodes)), jnp.float32),
          jnp.asarray(rng.normal(size=(3, 3, 1, nodes)) * 0.3, jnp.float32),
          jnp.ones(nodes), jnp.zeros(nodes))
  exact, exact_stats = dnw.solve_graph_ode(z0, args, rtol=1e-7, atol=1e-7)
  loose, loose_stats = dnw.solve_graph_ode(z0, args)  # the reference's 1e-3
  error = float(jnp.max(jnp.abs(loose - exact)))
  scale = 1.0 + float(jnp.max(jnp.abs(exact)))
  # A 1e-3 local (mixed absolute/relative) tolerance, accumulated over t in [0, 1]: over
  # 40 seeds the global error was at most 0.033 * scale.
  assert 0 < error < 0.1 * scale
  assert int(exact_stats["num_steps"]) > int(loose_stats["num_steps"]) >= 1

  # The model hands its rtol/atol (default 1e-3) to the solver and sows its step count.
  seen = []

  def spy(z, a, *, rtol, atol):
    seen.append((rtol, atol))
    return z, {"num_steps": jnp.int32(7)}

  monkeypatch.setattr(dnw, "solve_graph_ode", spy)
  model = dnw.continuous_graph(nodes=8, stem_width=4, num_outputs=4, prune_rate=0.75)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  _, state = model.apply(variables, x, mutable=["intermediates"])
  assert seen[-1] == (1e-3, 1e-3)
  assert int(state["intermediates"]["ode_num_steps"][0]) == 7


def _hand_wired_static():
  """A small static net whose random-graph mask is set by hand (a known wiring)."""
  model = dnw.static_graph(**{**SMALL, "graph": "random"})
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (3, *SMALL_SHAPE))
  variables = model.init(jax.random.key(1), x[:1])
  block = model.graph_blocks(SMALL_SHAPE)[0]
  mask = np.zeros(block["valid"].shape, np.float32)
  # Layers: 0..3 stem, 4..11 layer 1, 12..19 layer 2; outputs 16..19.
  for u, v in [(0, 4), (0, 5), (1, 12), (4, 16), (5, 13), (13, 19), (2, 6), (6, 14),
               (3, 17), (12, 18), (8, 15)]:
    mask[u, v] = 1.0
  assert (mask <= block["valid"]).all()
  variables = {**variables, "wiring": {"graph": {"mask": jnp.asarray(mask)}}}
  return model, variables, x


def _layer_flops(model, variables):
  """FLOPs of the stem/classifier layers (``.../kernel``); the graph's own products are
  what the export counts by formula."""
  return sum(r["flops"] for r in flops.count_layers(model, variables, SMALL_SHAPE)
             if r["kernel"] and r["kernel"].endswith("/kernel"))


@pytest.mark.slow
def test_export_removes_dead_nodes_and_keeps_the_logits():
  model, variables, x = _hand_wired_static()
  export = dnw.export_wiring(model, variables, SMALL_SHAPE)
  block = export["blocks"][0]
  # Nodes 14 and 15 (layer 2, not outputs) feed nothing, so 2 -> 6 -> 14 and 8 -> 15
  # are dead chains and their edges are removed. Live: 0,1,3,4,5,12,13 + 4 outputs.
  edges = {(u, v) for u, v, _ in block["edge_list"]}
  assert edges == {(0, 4), (0, 5), (1, 12), (4, 16), (5, 13), (13, 19), (3, 17), (12, 18)}
  assert block["edges"] == 11 and block["executed_edges"] == 8
  assert block["live_nodes"] == 11 and block["live_node_ops"] == 7
  spatial = SMALL_SHAPE[0] // 4
  layers = _layer_flops(model, variables)
  assert export["flops_executed"] == layers + (8 + 9 * 7) * spatial ** 2
  assert export["flops_dense_masked"] == layers + (block["valid_slots"] + 9 * 20) * spatial ** 2

  compact, compact_vars = dnw.compact_static(model, variables)
  assert sum(compact.block_sizes) == 11
  np.testing.assert_allclose(compact.apply(compact_vars, x), model.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_random_graph_mask_is_fixed_with_the_same_edge_count():
  model = dnw.static_graph(**{**SMALL, "graph": "random"})
  variables = model.init(jax.random.key(np.random.randint(1 << 30)), jnp.zeros((1, *SMALL_SHAPE)))
  block = model.graph_blocks(SMALL_SHAPE)[0]
  mask = np.asarray(variables["wiring"]["graph"]["mask"])
  assert mask.sum() == block["k"] == dnw.static_graph(**SMALL).edge_count()
  assert not (mask.astype(bool) & ~block["valid"]).any()
  assert "mask" not in variables["params"]["graph"]  # not trained


def test_discrete_graph_applies_its_graph_five_times_in_the_flops():
  model = dnw.discrete_graph(nodes=8, stem_width=4, num_outputs=4, prune_rate=0.75)
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (2, *SMALL_SHAPE))
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x).shape == (2, 10)
  export = dnw.export_wiring(model, variables, SMALL_SHAPE)
  block = export["blocks"][0]
  assert block["edges"] == 16 and block["steps"] == 5
  layers = _layer_flops(model, variables)
  spatial = SMALL_SHAPE[0] // 4
  assert export["flops_executed"] == layers + 5 * (
      block["executed_edges"] + 9 * block["live_node_ops"]) * spatial ** 2
  assert export["flops_dense_masked"] == layers + 5 * (64 + 9 * 8) * spatial ** 2


def test_baseline_choice_is_checked_before_any_work(tmp_path):
  with pytest.raises(UserError, match="dnw.baseline='best': choose one of none, random"):
    dnw_method.run(load_config("configs/dnw_cifar.py", "smoke", {"dnw.baseline": "best"}),
                   str(tmp_path / "a"))
  with pytest.raises(UserError, match="needs model.graph='dnw', not 'random'"):
    dnw_method.validate(load_config("configs/dnw_cifar.py", "smoke,graph=random,baseline=random"))
  assert not (tmp_path / "a").exists()
  dnw_method.validate(load_config("configs/dnw_mobilenet.py", "smoke,baseline=random"))


def test_get_model_names_the_dnw_graphs():
  assert isinstance(models.get_model("dnw_static", 10), dnw.StaticGraphNet)
  assert isinstance(models.get_model("dnw_mobilenet", 10, width=0.3), dnw.MobileNetV1Like)


@pytest.mark.parametrize("path,arg,model", [
    ("configs/dnw_cifar.py", "smoke,graph=dnw,baseline=random",
     dict(block_sizes=(4, 8, 8), num_outputs=4, prune_rate=0.75)),
    ("configs/dnw_mobilenet.py", "smoke,width=0.3",
     dict(blocks=((32, 16, 1, 1), (16, 32, 2, 2)))),
])
@pytest.mark.e2e
def test_recipe_smoke_writes_wiring_plot_and_report(tmp_path, path, arg, model):
  config = load_config(path, arg)
  config.model.update(model)
  config.train.max_steps = 2
  workdir = str(tmp_path / "run")
  out = dnw_method.run(config, workdir)
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    rep = json.load(f)
  assert rep["edges"] == rep["models"]["dense_masked"]["edges"] == out["edges"] > 0
  assert rep["flops_executed"] <= rep["flops_dense_masked"]
  assert rep["models"]["dense_masked"]["inference_ms"] > 0
  assert os.path.exists(os.path.join(workdir, "plots", "dnw_wiring.png"))
  with open(os.path.join(workdir, "wiring.json"), encoding="utf-8") as f:
    wiring = json.load(f)
  assert sum(len(b["edge_list"]) for b in wiring["blocks"]) == rep["executed_edges"]
  if config.dnw.baseline == "random":  # the same budget, scored on the same images
    random_row = rep["models"]["random_graph"]
    assert random_row["edges"] == rep["edges"]
    assert random_row["flops"] == rep["flops_dense_masked"]
    assert rep["random_graph_accuracy"] == random_row["accuracy"]
    assert rep["accuracy_change"] == pytest.approx(
        rep["test_accuracy"] - rep["random_graph_accuracy"], abs=1e-9)
    assert 0 <= rep["accuracy_change_se"] < 1
    assert os.path.isdir(os.path.join(workdir, "random_graph", "final"))
  if "blocks" in model:  # MobileNet: each block keeps MobileNetV1 x width's pointwise edges
    for row, (inp, out, _, n) in zip(wiring["blocks"], model["blocks"]):
      assert abs(row["edges"] - (inp * out + (n - 1) * out * out) * 0.3 ** 2) < 1
