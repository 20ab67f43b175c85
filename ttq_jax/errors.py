"""Errors that mean "the user asked for something we cannot do": `main` prints them as one line.

Everything else (KeyError, TypeError, a failed assertion, ...) is a bug in ttq_jax or in a user's
Python code and keeps its traceback.
"""


class ConfigError(ValueError):
  """A bad config value or flag: names the value and what is allowed."""


class DataError(ValueError):
  """Missing or malformed dataset files."""


class CheckpointError(RuntimeError):
  """No readable checkpoint, or a checkpoint that does not fit the request."""


class ExportError(ValueError):
  """A malformed export file or an export request that cannot be served (names the tensor or step)."""


class NonFiniteError(FloatingPointError):
  """Loss or gradients stopped being finite."""


class Interrupted(RuntimeError):
  """SIGINT / SIGTERM where no checkpoint could be taken (e.g. during the final evaluation): says what is saved."""
  exit_code = 130


USER_ERRORS = (ConfigError, DataError, CheckpointError, ExportError, NonFiniteError, Interrupted)
