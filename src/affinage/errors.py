"""The one base of every error a user can fix.

Every user-facing error (recipe, data, model folder, cluster profile, submission, strategy, eval
spec) derives from :class:`UserError`, so the CLI catches one type and prints one paragraph, with no
traceback. Anything else reaching the CLI is a bug in affinage and keeps its traceback.
"""


class UserError(Exception):
    """An error in the user's input or environment, with a message that says how to fix it."""


class DiskFullError(UserError, OSError):
    """No space left (or quota exceeded) while writing: say where, what survived and how to go on."""


def is_disk_full(exc: BaseException, *paths) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exceeded quota.

    torch.save and safetensors wrap the OS error in their own RuntimeError, sometimes without its
    text ("iostream error", "unexpected pos"): then a file system in ``paths`` with (almost) no free
    space left is taken as the cause.
    """
    import errno
    import shutil

    seen, cur = 0, exc
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cur)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    if isinstance(exc, (OSError, RuntimeError)):
        for path in paths:
            try:
                if path is not None and shutil.disk_usage(path).free < (4 << 20):
                    return True
            except OSError:
                continue
    return False
