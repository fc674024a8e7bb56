"""What every TAS search space shares: the :class:`Space` protocol, the width and depth
candidates (tas.md §1) and the :class:`Selection` of sampled widths (§2)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError

# §1: a conv with c output channels may keep int(c * r) of them.
WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Architecture logits start at N(0, 0.01) (§1).
ARCH_INIT_STD = 0.01


def width_candidates(c: int) -> tuple[int, ...]:
  """Width candidates of a conv with `c` output channels (tas.md §1).

  The sorted set of ``int(c * r)`` for r in 0.3, 0.4, ..., 1.0, e.g.
  ``width_candidates(16) == (4, 6, 8, 9, 11, 12, 14, 16)``. Small `c` can give
  fewer than 8 distinct candidates (and 0, for c < 4, is dropped).
  """
  if not isinstance(c, (int, np.integer)) or c < 1:
    raise UserError(f"width_candidates: channels must be a positive int, got "
                    f"{c!r}.")
  return tuple(sorted({int(c * r) for r in WIDTH_RATIOS} - {0}))


def rounded_candidates(width: int, round_to: int = 1) -> tuple[int, ...]:
  """Width candidates of a group (tas.md §1), rounded up to multiples of `round_to`
  (capped at the full width; duplicates merged)."""
  base = width_candidates(width)
  if round_to <= 1:
    return base
  return tuple(sorted({min(width, int(math.ceil(c / round_to) * round_to)) for c in base}))


def fitted_candidates(width: int, round_to: int, num_picks: int) -> tuple[int, ...]:
  """:func:`rounded_candidates` at the largest of ``round_to, round_to // 2, ..., 1`` that
  leaves the group ``num_picks`` candidates: a backend-default ``round_to`` (8 or 16 on a
  CPU) never makes a narrow group unsearchable."""
  r = int(round_to)
  while r > 1 and len(rounded_candidates(width, r)) < num_picks:
    r //= 2
  return rounded_candidates(width, max(r, 1))


def depth_candidates(n: int) -> tuple[int, ...]:
  """Depth candidates of a CIFAR stage with `n` blocks (tas.md §1).

  n=2 -> (1, 2); n=3 -> (1, 2, 3); n>3 -> 1, 3, 5, ... up to n, n included
  (ResNet-110: (1, 3, ..., 17, 18)). n=1 (ResNet-8, used in tests) gives (1,),
  which the official code rejects.
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise UserError(f"depth_candidates: a stage needs >= 1 block, got {n!r}.")
  if n <= 3:
    return tuple(range(1, n + 1))
  choices = list(range(1, n + 1, 2))
  if choices[-1] != n:
    choices.append(n)
  return tuple(choices)


def imagenet_depth_candidates(
    full_depths: Sequence[int]) -> list[tuple[int, ...]]:
  """Depth candidates of every stage of an ImageNet ResNet (tas.md §1).

  Stage s with ``n`` blocks keeps ``int(n * j / min_depth)`` blocks for
  j = 1..min_depth, where ``min_depth`` is the smallest stage depth:
  ResNet-18 [2, 2, 2, 2] -> (1, 2) per stage; ResNet-50 [3, 4, 6, 3] ->
  (1, 2, 3), (1, 2, 4), (2, 4, 6), (1, 2, 3).
  """
  full_depths = list(full_depths)
  if not full_depths or any(
      not isinstance(n, (int, np.integer)) or n < 1 for n in full_depths):
    raise UserError(f"imagenet_depth_candidates: every stage needs >= 1 block, "
                    f"got {full_depths!r}.")
  min_depth = min(full_depths)
  # n >= min_depth, so the steps n / min_depth >= 1 keep the choices distinct.
  return [tuple(int(n * j / min_depth) for j in range(1, min_depth + 1))
          for n in full_depths]


class Selection(NamedTuple):
  """Two sampled width candidates of a conv (all traced).

  Attributes:
    indices: ``[k]`` int32 candidate indices, distinct.
    weights: ``[k]`` mixing weights (sum to 1; carry the gradient to alpha).
    widths: ``[k]`` int32 channel counts ``C_j`` of the picks.
  """
  indices: jax.Array
  weights: jax.Array
  widths: jax.Array

  @property
  def out_width(self) -> jax.Array:
    """``max_j C_j``: the valid width of the mixed output (§4)."""
    return jnp.max(self.widths)


@runtime_checkable
class Space(Protocol):
  """A TAS search space, as the recipe's stages use it (tas.md §1-§7).

  Implemented by :class:`jaxprune.search.ResNetSpace` (the official supernet) and
  :class:`jaxprune.search.SearchSpace` (any model's graph). ``arch`` is the tree of
  architecture parameters (``width_logits``, ``depth_logits``).
  """
  kind: str            # "resnet" or "graph": the name ``tas.space`` selects it by
  input_shape: Any     # one example's shape
  flops_max: int       # FLOPs of the full network (the cost loss's max, §5)

  def init(self, key: jax.Array) -> tuple[Any, Any, Any]:
    """``(params, model_state, arch)`` of a fresh search."""

  def forward(self, params, model_state, arch, x, tau, key: jax.Array):
    """The train-mode search forward (§4): ``(logits, new model_state)``."""

  def expected_cost(self, arch: Mapping[str, Any]) -> jax.Array:
    """E_cost (§5): expected FLOPs, differentiable and jit-safe in `arch`."""

  def argmax_cost(self, arch: Mapping[str, Any]) -> jax.Array:
    """F_cost (§5): FLOPs of the argmax architecture, a jit-safe scalar."""

  def record(self, arch: Mapping[str, Any]) -> dict:
    """The space's keys of an ``arch_history.jsonl`` line (host, concrete `arch`)."""

  def derived_from(self, record: Mapping[str, Any]) -> tuple[Any, dict]:
    """``(model, architecture)``: the derived network of a :meth:`record` (§7) and
    its ``widths``/``blocks`` for ``architecture.json``."""


__all__ = ["ARCH_INIT_STD", "WIDTH_RATIOS", "Selection", "Space", "depth_candidates",
           "imagenet_depth_candidates", "width_candidates"]
