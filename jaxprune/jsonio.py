"""Standard JSON files: atomic writes, no NaN/Infinity, a damaged file is one UserError."""
import json
import math
import os
from typing import Any

from jaxprune.errors import UserError


def standard(obj: Any) -> Any:
  """``obj`` with every NaN/Infinity float replaced by None (JSON has no such numbers)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: standard(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [standard(v) for v in obj]
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """Standard JSON (no ``NaN``/``Infinity``, which standard parsers reject)."""
  return json.dumps(standard(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj: Any, **kwargs):
  """Writes ``obj`` as standard JSON through a temporary file: a crash leaves the old
  file or the new one, never half of one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(dumps(obj, indent=2, **kwargs) + "\n")
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  """Reads a JSON file this program wrote; a damaged one is a :class:`UserError`."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is damaged ({e}); restore it, or delete it if the run "
                    "can rebuild it (see docs/cli.md, Faults and errors).") from None
