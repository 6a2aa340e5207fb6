"""The one base of every error a user can fix.

Every user-facing error (recipe, data, model folder, cluster profile, submission, strategy, eval
spec) derives from :class:`UserError`, so the CLI catches one type and prints one paragraph, with no
traceback. Anything else reaching the CLI is a bug in affinage and keeps its traceback.
"""


class UserError(Exception):
    """An error in the user's input or environment, with a message that says how to fix it."""
