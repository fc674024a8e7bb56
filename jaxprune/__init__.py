"""jaxprune: neural-network pruning and structure search in JAX/Flax.

Submodules: ``kernels`` (pure math of the methods), ``optim`` (optax pieces),
``models`` (Flax modules), ``flops`` (the FLOPs/params counter), ``distill`` (KD
loss), ``data`` (input pipelines), ``engine`` (training), ``methods`` (recipes),
``main`` (the CLI). Import them as ``from jaxprune import models, flops``.
"""

__version__ = "0.1.0"
