"""The one helper that names and selects parameter leaves by path ('/'-joined, the same
name in Linen and NNX trees). Knows no models and no transforms."""
import re
from collections.abc import Callable, Collection
from typing import Any, Union

import jax
import jax.numpy as jnp

# None (every leaf), a regular expression searched in the leaf path, a predicate
# ``fn(path, leaf) -> bool``, or a collection of leaf paths (a set, list or tuple).
Selector = Union[None, str, Callable[[str, Any], bool], Collection[str]]

_VARIABLE_KEY = "value"  # the attribute an NNX Variable (or Linen box) holds its array in


def leaf_path(path) -> str:
  """The leaf's name: '/'-joined keys of a key path, e.g. ``stage1/block0/bn_a/scale``.

  A trailing attribute key ``value`` (an NNX ``Variable``'s array, a Linen
  ``nn.Partitioned`` box's array) is dropped, so Linen params, NNX state,
  ``nnx.as_pure`` / ``nnx.to_pure_dict`` trees and plain dicts name the same
  parameter alike. Dict keys called ``"value"`` are kept.
  """
  path = tuple(path)
  if (path and isinstance(path[-1], jax.tree_util.GetAttrKey)
      and path[-1].name == _VARIABLE_KEY):
    path = path[:-1]
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(jax.tree_util.keystr((k,)))
  return "/".join(parts)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """``[(leaf path, leaf), ...]`` in ``jax.tree.leaves`` order.

  Raises:
    ValueError: if two leaves get the same path (a tree mixing conventions).
  """
  out = [(leaf_path(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
  seen = set()
  for name, _ in out:
    if name in seen:
      raise ValueError(f"Two leaves of this tree are both named {name!r}; give the "
                       "parameters distinct paths.")
    seen.add(name)
  return out


def paths(tree: Any) -> list[str]:
  """The leaf paths of ``tree`` in leaf order."""
  return [name for name, _ in named_leaves(tree)]


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """``jax.tree.map`` with the leaf path: ``fn(path: str, leaf)`` on every leaf.

  The result keeps ``tree``'s structure (NNX ``Variable`` boxes included).
  """
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(leaf_path(p), x), tree)


def listing(names, limit=12) -> str:
  """``names`` for an error message: the first ``limit`` quoted, then how many in all."""
  names = list(names)
  shown = ", ".join(repr(n) for n in names[:limit])
  more = f", ... ({len(names)} in all)" if len(names) > limit else ""
  return f"[{shown}{more}]"


def _is_path_collection(selector) -> bool:
  return (isinstance(selector, Collection) and not isinstance(selector, (str, dict))
          and all(isinstance(s, str) for s in selector))


def select(tree: Any, selector: Selector, *, allow_empty: bool = False) -> Any:
  """A boolean pytree shaped like ``tree``: True where ``selector`` picks the leaf.

  Args:
    tree: a params pytree (arrays or shape structs): Linen params, an
      ``nnx.State``, an ``nnx.as_pure`` / ``nnx.to_pure_dict`` tree, a dict.
    selector: None (every leaf); a regular expression searched in the leaf's path
      (see :func:`leaf_path`), e.g. ``r"(^|/)kernel$"``; a predicate
      ``fn(path: str, leaf) -> bool``; or a collection of leaf paths.
    allow_empty: accept a selector that picks no leaf (default: an error).

  Returns:
    A tree like ``tree`` with Python bools (inside ``Variable`` boxes for NNX state).

  Raises:
    ValueError: if the selector picks no leaf (it lists the available paths), or a
      collection names a path the tree does not have.

  Example (the same selection on the same model in Linen and in NNX):
    >>> mask = select(variables["params"], r"(^|/)kernel$")          # Linen
    >>> mask = select(nnx.state(model, nnx.Param), r"(^|/)kernel$")  # NNX
    >>> tx = optax.masked(optax.add_decayed_weights(5e-4), mask)
  """
  names = paths(tree)
  if selector is None:
    return jax.tree.map(lambda _: True, tree)
  if isinstance(selector, str):
    pattern = re.compile(selector)
    pick = lambda p, _: pattern.search(p) is not None
    what = f"the pattern {selector!r}"
  elif callable(selector):
    pick = selector
    what = f"the predicate {getattr(selector, '__name__', selector)!r}"
  elif _is_path_collection(selector):
    wanted = set(selector)
    missing = sorted(wanted - set(names))
    if missing:
      raise ValueError(f"No leaf is named {missing[0]!r} (of {len(missing)} requested "
                       f"paths missing); the tree has {listing(names)}.")
    pick = lambda p, _: p in wanted
    what = "an empty collection of paths"
  else:
    raise TypeError("A selector is None, a path regex, fn(path, leaf) -> bool or a "
                    f"collection of leaf paths, not {type(selector).__name__}.")
  out = map_with_path(lambda p, x: bool(pick(p, x)), tree)
  if not allow_empty and names and not any(jax.tree.leaves(out)):
    raise ValueError(f"{what[0].upper() + what[1:]} selects no leaf; the tree has "
                     f"{listing(names)}. Paths are '/'-joined names, the same for Linen "
                     "params and NNX state (no trailing 'value').")
  return out


def as_mask(tree: Any, mask: Any, *, allow_empty: bool = False) -> Any:
  """``mask`` as a boolean tree shaped like ``tree``.

  ``mask`` is a selector (see :func:`select`) or a boolean pytree with the same
  leaf paths as ``tree`` (built from Linen params, NNX state or a pure dict: leaves
  are matched by path, so a mask built from ``nnx.as_pure(state)`` works on the
  ``Variable`` state an ``nnx.Optimizer`` passes to ``init``). Leaves of a boolean
  tree may be Python bools or boolean arrays (per-entry masks).
  """
  if mask is None or isinstance(mask, str) or callable(mask) or _is_path_collection(mask):
    return select(tree, mask, allow_empty=allow_empty)
  by_path = dict(named_leaves(mask))
  names = paths(tree)
  missing = [n for n in names if n not in by_path]
  if missing:
    raise ValueError(f"The mask tree has no entry for the leaf {missing[0]!r}; it has "
                     f"{listing(by_path)}.")
  out = map_with_path(lambda p, _: by_path[p], tree)
  values = jax.tree.leaves(out)
  if (not allow_empty and names and all(isinstance(v, bool) for v in values)
      and not any(values)):
    raise ValueError(f"The mask selects no leaf (all False); the tree has {listing(names)}.")
  return out


def check_broadcast(path: str, gate_shape, leaf_shape, what: str = "gate") -> None:
  """Raises ``ValueError`` unless a ``gate_shape`` array broadcasts to ``leaf_shape``."""
  gate_shape, leaf_shape = tuple(gate_shape), tuple(leaf_shape)
  try:
    ok = jnp.broadcast_shapes(gate_shape, leaf_shape) == leaf_shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"The {what} of {path!r} has shape {gate_shape}, which does not "
                     f"broadcast to the leaf's shape {leaf_shape}.")
