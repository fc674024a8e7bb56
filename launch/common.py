"""What every launcher shares: the training command and how to split argv.

Every launcher runs the same program on each process, ``python -m jaxprune.main``
with the arguments given after ``--``; only the environment that tells a
process who it is differs (see ``jaxprune/engine/distributed.py``).
"""
import shlex
import sys

MAIN = ("-m", "jaxprune.main")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
  """``launcher options -- jaxprune.main arguments`` -> (options, main arguments); a
  ``-h``/``--help`` before any ``--`` is passed on, so the launcher's parser prints its help."""
  options = argv[:argv.index("--")] if "--" in argv else argv
  if "-h" in options or "--help" in options:
    return options, []
  if "--" not in argv:
    sys.exit("error: give the training arguments after '--', e.g. "
             "-- --config configs/tas_resnet.py:smoke --workdir /tmp/run")
  i = argv.index("--")
  main_args = argv[i + 1:]
  if not any(a == "--config" or a.startswith("--config=") for a in main_args):
    sys.exit("error: the arguments after '--' need --config (and --workdir).")
  return argv[:i], main_args


def main_command(main_args: list[str], python: str = "python") -> list[str]:
  return [python, *MAIN, *main_args]


def shell_join(words: list[str]) -> str:
  return " ".join(shlex.quote(w) for w in words)
