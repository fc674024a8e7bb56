"""One recipe per method, picked by ``config.method``: a module with ``run(config,
workdir) -> dict`` (and optionally ``validate(config)``), started by
:func:`jaxprune.methods.common.start`."""
import importlib

from jaxprune import config_lib
from jaxprune.engine import distributed
from jaxprune.engine import runtime
from jaxprune.models import layers
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
  recipe = importlib.import_module(RECIPES[config.method])
  config_lib.validate(config)
  if hasattr(recipe, "validate"):
    recipe.validate(config)
  config_lib.start_invocation()  # the report's wall_time_s counts from here (or main's start)
  previous = layers.choice()
  settings = runtime.apply(config.get("runtime"))
  if distributed.is_main_process():
    print(f"[runtime] backend {settings['backend']}: {settings['layers']} layers, XLA:CPU "
          f"flag {'on' if settings['xla_cpu_flags'] else 'off'}, allocator tuning "
          f"{'on' if settings['malloc_tuning'] else 'off'} (config.runtime)", flush=True)
  try:
    return recipe.run(config, workdir)
  finally:
    layers.use(previous)
    config_lib.release_workdir(workdir)
