"""One exception type for everything a user can get wrong.

The CLI turns a :class:`BertopsError` into a one-line message and a non-zero exit code, so every
message must name the problem *and* the fix; anything else that escapes is a bug and keeps its
traceback.
"""


class BertopsError(Exception):
    """A user-facing error: the message names the problem and the fix."""

    label = "error"  # the CLI's prefix
    exit_code = 1
