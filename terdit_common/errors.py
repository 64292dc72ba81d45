"""The error type every command-line tool reports as one line with exit code 2."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input or an unusable environment: the message names the file / flag / value, the rule
    and the way out. CLIs print it as `error: <message>` and exit with code 2."""
