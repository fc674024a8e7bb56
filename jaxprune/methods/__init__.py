"""One recipe per method; ``config.method`` picks it.

A recipe is a module with ``run(config, workdir) -> dict`` that runs its stages in
order (each resumable in ``<workdir>/<stage>/``) and writes the final report.
"""
import importlib

from jaxprune.errors import UserError

RECIPES = {
    "autoprune": "jaxprune.methods.autoprune",
    "baseline": "jaxprune.methods.baseline",
    "ista": "jaxprune.methods.ista",
    "prune": "jaxprune.methods.prune",
    "dnw": "jaxprune.methods.dnw",
    "tas": "jaxprune.methods.tas",
}


def run(config, workdir: str) -> dict:
  if config.method not in RECIPES:
    raise UserError(f"Unknown method {config.method!r}; known methods: "
                    f"{', '.join(sorted(RECIPES))}.")
  return importlib.import_module(RECIPES[config.method]).run(config, workdir)
