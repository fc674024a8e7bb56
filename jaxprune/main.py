"""jaxprune's command line: ``python -m jaxprune.main --config configs/X.py --workdir DIR``
(``--config.a.b=v`` overrides; rerunning the command resumes the run in DIR)."""
import os
import signal
import sys
import time

_STARTED = [time.time()]  # the report's wall_time_s counts from here (before the imports)


def _interrupted(where: str):
  """One line and exit 130 for a Ctrl-C (SIGINT) outside a training stage (a stage saves
  a checkpoint and reports itself). ``os._exit``: a library's exit handler must not turn
  it into a traceback, nor Python's own SIGINT exit into another code."""
  advice = ("rerun the same command to start" if "before any work" in where else
            "rerun the same command to resume" if "outside" in where else "nothing is lost")
  print(f"interrupted (SIGINT) {where}; {advice}.", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access


_PHASE = ["before any work"]  # what a Ctrl-C outside the workdir's lock interrupts


def _on_sigint(signum, frame):  # pylint: disable=unused-argument
  """Until the run holds its workdir nothing is written: exit at once (a KeyboardInterrupt
  raised inside a library's garbage-collection callback would be swallowed). After, unwind
  (the workdir's lock and files are closed) and :func:`run` says it in one line."""
  lib = sys.modules.get("jaxprune.engine.workdir")  # not imported here: a handler
  if lib is not None and lib.held():
    raise KeyboardInterrupt
  _interrupted(_PHASE[0])


if __name__ == "__main__":  # the command line only, not a program that imports this module
  signal.signal(signal.SIGINT, _on_sigint)

try:
  import difflib
  import importlib.util

  from absl import app, flags, logging
  from ml_collections import config_flags

  from jaxprune import config_lib
  from jaxprune import methods
  from jaxprune.engine import checkpoint
  from jaxprune.engine import distributed
  from jaxprune.engine import runtime
  from jaxprune.engine.loop import Interrupted
  from jaxprune.errors import UserError
except KeyboardInterrupt:
  _interrupted("before any work")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, metrics, report.")
config_flags.DEFINE_config_file("config", None, "A config file from configs/, with "
                                "optional ':args'.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _missing_key(config, dotted: str) -> str | None:
  """The first part of ``dotted`` that ``config`` lacks, with close matches."""
  node, done = config, []
  for part in dotted.split("."):
    if not hasattr(node, "keys"):  # a value, e.g. the string model.kwargs
      where = ".".join(done)
      hint = (" It is a Python dict literal: --config.model.kwargs=\"{'key': value}\"."
              if where == "model.kwargs" else "")
      return (f"The config has no key {dotted!r} (from --config.{dotted}): {where} is a "
              f"value ({type(node).__name__}), not a group of keys.{hint}")
    keys = list(node.keys())
    if part not in keys and config_lib.no_target(dotted):
      return config_lib.no_target(dotted)  # ista.target, autoprune.target: why not
    if part not in keys:
      where = ".".join(done) or "the config"
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      prefix = ".".join(done + [""])
      hint = (f" Did you mean {', '.join('--config.' + prefix + c for c in close)}?"
              if close else f" Keys of {where}: {', '.join(sorted(keys)) or 'none'}.")
      return f"The config has no key {dotted!r} (from --config.{dotted}).{hint}"
    node, done = node[part], done + [part]
  return None


def _load_config(argv):
  """The config named by ``--config`` in ``argv`` without its overrides, or None."""
  for i, arg in enumerate(argv):
    value = (arg.split("=", 1)[1] if arg.startswith("--config=") else
             argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value:
      path, _, config_arg = value.partition(":")
      try:
        spec = importlib.util.spec_from_file_location("_jaxprune_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(config_arg) if config_arg else module.get_config()
      except UserError:
        raise
      except Exception:  # pylint: disable=broad-except
        return None
  return None


def _flag_error(e: Exception, argv) -> str:
  """One readable line for a bad command line (no traceback wall)."""
  # config_flags re-raises a config file's exception with its traceback in the
  # message; the original, innermost UserError carries the plain message.
  cause, innermost = e, None
  while cause is not None:
    if isinstance(cause, UserError):
      innermost = cause
    cause = cause.__cause__ or cause.__context__
  if innermost is not None:
    return str(innermost)
  try:
    config = _load_config(argv)
  except UserError as user_error:
    return str(user_error)
  if config is not None:
    for arg in argv[1:]:
      if arg.startswith("--config."):
        message = _missing_key(config, arg[len("--config."):].split("=", 1)[0])
        if message:
          return message
  return str(e)


def _config_path(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].partition(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].partition(":")[0]
  return None


def parse_flags(argv):
  path = _config_path(argv)
  if path and not os.path.isfile(path):
    print(f"error: no config file {path!r} (from --config; run from the repository root, "
          "e.g. --config configs/tas_resnet.py:smoke).", file=sys.stderr)
    sys.exit(2)
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError) as e:  # TypeError: into a str
    print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # keep library INFO chatter (orbax) out of the way
    logging.set_verbosity(logging.WARNING)
    checkpoint.quiet_orbax_errors()  # a failed save is reported in one line instead
  try:
    config = FLAGS.config
  except OSError as e:  # the config file failed to load (config_flags keeps the cause)
    first = str(e).strip().splitlines()
    print(f"error: {first[-1].strip() if first else e} (loading --config)", file=sys.stderr)
    sys.exit(2)
  run(config, FLAGS.workdir)


def run(config, workdir: str):
  """Runs the config's recipe; every way it can stop short is one line and an exit code."""
  try:
    runtime.configure_run(config)  # before the backend starts (the flag follows the model)
    distributed.initialize()  # one of several processes? (launch/ sets the environment)
    config_lib.start_invocation(_STARTED.pop() if _STARTED else time.time())
    methods.run(config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # between stages, or while a stage's results are written
    _interrupted("outside a training stage; what was finished is kept")
  finally:
    # The workdir is released: a Ctrl-C while the interpreter shuts down (library exit
    # handlers) ends it at once, in one line.
    _PHASE[0] = "while exiting, after the run ended"
    if __name__ == "__main__":
      signal.signal(signal.SIGINT, _on_sigint)


if __name__ == "__main__":
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:  # while the flags and the config file load
    _interrupted("before any work")
