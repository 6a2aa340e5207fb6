"""The one base of every error a user can fix.

Every user-facing error (recipe, data, model folder, cluster profile, submission, strategy, eval
spec) derives from :class:`UserError`, so the CLI catches one type and prints one paragraph, with no
traceback. Anything else reaching the CLI is a bug in affinage and keeps its traceback.
"""


class UserError(Exception):
    """An error in the user's input or environment, with a message that says how to fix it."""


class DiskFullError(UserError, OSError):
    """No space left (or quota exceeded) while writing: say where, what survived and how to go on."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exceeded quota.

    torch.save and safetensors wrap the OS error in their own RuntimeError, keeping only its text.
    """
    import errno

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
