"""The channel dependency graph of any Flax model or ``f(params, x)``, traced from its jaxpr.

Knows wiring only: surgery removes groups, flops counts from the same trace. How it works:
docs/design/graph.md.
"""
from jaxprune.graph.tracing import Traced, named_leaves, trace_jaxpr
from jaxprune.graph import adapters, tracing
from jaxprune.graph.group import Graph, Group, Member, kept_slices, trace

__all__ = ["Graph", "Group", "Member", "Traced", "kept_slices", "named_leaves", "trace",
           "trace_jaxpr"]
