"""The one exception type of user mistakes that surface while a run works: a bad data file or sidecar, a
record without its text field, a malformed chat line, a corrupt checkpoint or one without its marker, a
truncated weights file, the abort on non-finite losses. It is raised where the problem is detected, with the
file or key and the fix in its message; `launch/train.py` prints it as one message on rank 0 and exits with
a non-zero code, without a traceback. Any other exception is a bug and keeps its traceback.

It subclasses ValueError, the type treadle's user errors had before (STYLE.md §7), so configuration checks
and callers that catch ValueError keep working.
"""

from __future__ import annotations

__all__ = ["USER_ERROR_EXIT_CODE", "UserError"]

USER_ERROR_EXIT_CODE = 1


class UserError(ValueError):
    """A mistake in the config, the data or the files a run was pointed at; the message names it and the fix."""
