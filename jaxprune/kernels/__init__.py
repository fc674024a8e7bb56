"""Pure ``jnp`` math of the pruning and search methods: no Flax, no state.

Each kernel is a function of arrays (and a PRNG key where it samples), jit- and
vmap-safe, with shapes in its docstring. Modules, optimizers and recipes build
on these; nothing here may import from ``jaxprune.models``, ``optim`` or
``methods``.

TAS (reference/tas.md):
  ``gumbel_softmax``, ``gumbel_select`` — Gumbel sampling of depths and widths.
  ``cwi``, ``cwi_masked``, ``cwi_matrix``, ``cwi_matrix_traced`` — channel-wise
  interpolation, with static or traced (sampled) widths.
  ``tas_cost_loss`` — the FLOPs cost loss (code and paper variants).

AutoPrune (reference/autoprune.md):
  ``step_ste`` — unit-step gate forward, surrogate derivative backward.

DNW (reference/dnw.md):
  ``topk_ste`` — top-k |w| forward, identity backward; ``topk_mask`` its exact-k mask.

ISTA (reference/ista.md):
  ``soft_threshold`` — the L1 prox that gives exact-zero batch-norm scales.
"""
from jaxprune.kernels.cost import tas_cost_loss
from jaxprune.kernels.cwi import cwi
from jaxprune.kernels.cwi import cwi_masked
from jaxprune.kernels.cwi import cwi_matrix
from jaxprune.kernels.cwi import cwi_matrix_traced
from jaxprune.kernels.gumbel import gumbel_select
from jaxprune.kernels.gumbel import gumbel_softmax
from jaxprune.kernels.ste import step_ste
from jaxprune.kernels.topk import topk_mask
from jaxprune.kernels.topk import topk_ste
from jaxprune.kernels.prox import soft_threshold

__all__ = [
    # TAS
    "gumbel_softmax",
    "gumbel_select",
    "cwi",
    "cwi_masked",
    "cwi_matrix",
    "cwi_matrix_traced",
    "tas_cost_loss",
    # AutoPrune
    "step_ste",
    # DNW
    "topk_ste",
    "topk_mask",
    # ISTA
    "soft_threshold",
]
