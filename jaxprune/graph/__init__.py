"""The channel dependency graph of any model, traced from the jaxpr of its forward pass.

``graph.trace(model, variables, input_shape, call=None)`` runs the forward pass once
under :func:`jax.make_jaxpr` (no arithmetic) and follows every channel axis through
every primitive. It works on a Linen module with its variables, an ``nnx.Module``
(``variables=None``) or a pure function ``f(params, x)``, with no list of known
layers: a user's layer written with ``lax``/``jnp`` is followed like ``nn.Conv``.

Leaf paths are the '/'-joined key paths of the model's variables
(:func:`jaxprune.optim.leaf_path`, NNX's trailing ``value`` dropped):
``params/conv1/kernel``, ``batch_stats/bn1/mean`` for Linen variables,
``conv1/kernel``, ``bn1/mean`` for an NNX module, the params tree's own paths for a
pure function.

How it works: every axis of every parameter leaf gets fresh integer ids, one per
index, and so does the channel (last) axis of the input. Each primitive states which
indices must stay together (a contraction pairs the activation's channel ids with
the kernel's input-axis ids; an elementwise op or a residual add pairs its operands'
ids; a concatenation lays ids side by side; a reshape carries ids to the flattened
positions), and the connected components of that relation are the channels. A
component with an output-feature axis of a conv or ``dot_general`` parameter (a
*producer*) is a channel; channels that touch the same (leaf, axis) set in the same
pattern form a :class:`Group` — the slices that must be removed together. Ops the
graph cannot follow mark the channels they touch unprunable with the reason;
channels that reach the input or the model's output are unprunable too.

Layering: this package knows wiring only. ``jaxprune.surgery`` removes groups and
rebuilds the network, ``jaxprune.flops`` counts from the same trace.
"""
from jaxprune.graph.tracing import Traced, named_leaves, trace_jaxpr
from jaxprune.graph import adapters, tracing
from jaxprune.graph.group import Graph, Group, Member, kept_slices, trace

__all__ = ["Graph", "Group", "Member", "Traced", "kept_slices", "named_leaves", "trace",
           "trace_jaxpr"]
