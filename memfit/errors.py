"""Error types. A `UserError` is something the user caused and can fix: the CLI prints its message
on one line and exits with code 2. Everything else is a bug (exit code 1)."""


class UserError(ValueError):
    """Bad input: the message names the problem and the fix."""
