"""The one helper that selects parameter leaves by path.

Every transform or recipe that acts on part of a model (weight decay on kernels
only, a prox on BN scales, auxiliary parameters on chosen layers) builds its
boolean mask here, so "which leaves" means the same thing everywhere.
"""
import re
from typing import Any, Callable, Union

import jax

Selector = Union[None, str, Callable[[str, Any], bool]]


def leaf_path(path) -> str:
  """'/'-joined names of a key path, e.g. ``stage1/block0/bn_a/scale``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(jax.tree_util.keystr((k,)))
  return "/".join(parts)


def select(tree: Any, selector: Selector) -> Any:
  """A boolean pytree shaped like ``tree``: True where ``selector`` picks the leaf.

  Args:
    tree: a params pytree (arrays or shape structs).
    selector: None (every leaf); a regular expression searched in the leaf's path
      (see :func:`leaf_path`), e.g. ``r"(^|/)kernel$"``; or a predicate
      ``fn(path: str, leaf) -> bool``.

  Example:
    >>> mask = select(params, r"bn.*/scale$")
    >>> tx = optax.masked(optax.add_decayed_weights(5e-4), mask)
  """
  if selector is None:
    return jax.tree.map(lambda _: True, tree)
  if isinstance(selector, str):
    pattern = re.compile(selector)
    pick = lambda p, _: pattern.search(p) is not None
  else:
    pick = selector
  return jax.tree_util.tree_map_with_path(lambda p, x: bool(pick(leaf_path(p), x)), tree)
