"""The one exception type for mistakes in the user's input.

Anything the user can fix (a bad path, a malformed annotation file, a checkpoint that does not match)
raises `ClipcapError` with a one-line message. The CLI prints that line and exits non-zero, with no
traceback; any other exception is a bug and keeps its traceback.
"""


class ClipcapError(Exception):
    """An error in the user's input, reported as a single line."""
