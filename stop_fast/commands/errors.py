"""The command line's own error type."""
from __future__ import annotations


class CLIError(Exception):
    """A mistake in what the user asked for; printed as one line naming the argument or file."""
