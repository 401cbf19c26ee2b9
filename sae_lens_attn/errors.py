"""One family for the errors a user can fix.

:class:`UserError` is the base of every error raised on purpose for something the caller can act on: a bad
value or file (:class:`InputError` and the specific classes beside the code that raises them, such as
``SAEFileError`` or ``UnsupportedModelError``), a case the code refuses, a write that failed (``WriteError``).
The command line prints such an error as one line and exits 2; anything else is a bug and surfaces as a
traceback with exit 1.

The base derives from ``Exception`` only, and each concrete class also derives from the builtin it always
was (``ValueError``, ``OSError``, ``FloatingPointError``, ``KeyError``), so ``except ValueError`` in a
caller keeps working and a write failure does not turn into a ``ValueError``.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user can fix; the command line prints them as one line and exits 2."""


class InputError(UserError, ValueError):
    """A value, option or file content the user gave is not acceptable (the message says why and what to do)."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the user named does not exist."""


class AlreadyExistsError(UserError, FileExistsError):
    """The output the user named already holds something this command will not overwrite."""


class UnavailableError(UserError, OSError):
    """A model, dataset or package named by the user could not be reached or read (not local, and the hub or
    index could not serve it)."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency (a pip extra) is not installed; the message names the extra."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a KeyError's message without the quotes ``str`` adds)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(msg).split())
