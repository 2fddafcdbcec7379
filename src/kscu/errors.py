"""One exception type for every user-facing mistake.

The CLI turns a ``KscuError`` into a single ``error: ...`` line and exit code 2, so every
message must name the problem *and* the fix, and must be raised before any output is written.
"""


class KscuError(Exception):
    """Bad input or an unrecoverable condition the user can fix (exit code 2 in the CLI)."""
