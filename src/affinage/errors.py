"""The base of every error a user can fix: the CLI prints these as one paragraph, no traceback."""


class AffinageError(Exception):
    """An error in the user's input or environment, with a message that says how to fix it."""
