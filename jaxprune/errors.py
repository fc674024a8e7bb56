"""The one exception type for mistakes a user can fix.

Anything raised as :class:`UserError` reaches the command line as a single line,
``error: <message>``, without a traceback. The message must say what to change
(the config key, the path, the flag). Library callers get an ordinary exception.
"""


class UserError(ValueError):
  """A mistake in a config, a path or a workdir that the user can fix."""
