"""Pure ``jnp`` math of the methods (TAS, ISTA, DNW, AutoPrune): no Flax, no state.

Must not import ``models``, ``optim`` or ``methods``. Notes: docs/design/kernels.md.
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
