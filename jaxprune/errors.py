"""``UserError``: a mistake a user can fix, shown by the command line as one ``error:`` line.
"""


class UserError(ValueError):
  """A mistake in a config, a path or a workdir that the user can fix."""
