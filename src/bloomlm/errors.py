"""Exceptions raised at bloomlm's API boundary.

They subclass the builtin a caller would already catch (ValueError, and FileNotFoundError for
missing files), so code written against transformers' errors keeps working.
"""


class CheckpointError(ValueError):
    """A weight or config file that exists but cannot be used:
    truncated, corrupt, or the wrong shapes."""


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """No usable checkpoint where one was asked for;
    the message names the folder and files looked for."""
