"""jaxprune: structured pruning and structure search (TAS, ISTA, DNW, AutoPrune) in JAX/Flax.

Subpackages, lowest layer first: ``kernels`` (the methods' pure math), ``optim`` (optax
transforms), ``graph`` (the channel graph of any Flax model), ``flops`` and ``latency`` (cost
models), ``surgery`` (removing channel groups), ``search`` (TAS search spaces), ``models``
(Flax modules), ``engine`` (training), ``methods`` (recipes); ``main`` is the command line.
Import them as ``from jaxprune import graph, surgery``. Docs: README.md and docs/.
"""

__version__ = "0.1.0"
