"""The tmem exception tree: each class carries the one errno Xen returns for it.

Inside tmemcore, failures are raised as these exceptions; ``do_tmem_op`` (hypercall.py) is
the single place that turns them into negative return codes, as Xen's ``do_tmem_op`` does.
Misses are *not* exceptions: a get that finds nothing returns ``None`` (0 at the ABI).

    TmemError (Exception)              errno
     ├── NoDevice                      ENODEV   19   pool id not created / out of range
     ├── NoMemory                      ENOMEM   12   budget or per-client page limit reached
     ├── NoSpace                       ENOSPC   28   duplicate put could not replace (old copy flushed)
     ├── NotPermitted                  EPERM     1   bad pool flags, version mismatch, table full
     ├── InvalidArgument               EINVAL   22   bad control argument, unknown client
     ├── BadAddress                    EFAULT   14   malformed record, bad guest buffer
     ├── NotImplementedOp              ENOSYS   38   unknown command
     ├── Frozen                        EFROZEN 1000  new put into a frozen client
     ├── Empty                         EEMPTY  1001  get on a pool that holds no pages
     └── StreamError                   EINVAL   22   corrupt, truncated or mismatched save stream
"""

from __future__ import annotations

import errno as _errno

EFROZEN = 1000
EEMPTY = 1001


class TmemError(Exception):
    """Base class: a tmem operation failed. ``errno`` is the positive Xen error number."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)

    @property
    def return_code(self) -> int:
        """The value Xen's do_tmem_op would return for this failure."""
        return -self.errno


class NoDevice(TmemError):
    """no such pool (not created, or pool id out of range)"""

    errno = _errno.ENODEV


class NoMemory(TmemError):
    """no memory for the page (budget full, or the client's page limit reached)"""

    errno = _errno.ENOMEM


class NoSpace(TmemError):
    """duplicate put could not replace the old copy; the old copy was flushed"""

    errno = _errno.ENOSPC


class NotPermitted(TmemError):
    """operation not permitted"""

    errno = _errno.EPERM


class InvalidArgument(TmemError):
    """invalid argument"""

    errno = _errno.EINVAL


class BadAddress(TmemError):
    """bad record or guest buffer"""

    errno = _errno.EFAULT


class NotImplementedOp(TmemError):
    """unknown tmem command"""

    errno = _errno.ENOSYS


class Frozen(TmemError):
    """client is frozen"""

    errno = EFROZEN


class Empty(TmemError):
    """pool holds no pages"""

    errno = EEMPTY


class StreamError(TmemError):
    """corrupt, truncated or mismatched save/restore stream"""

    errno = _errno.EINVAL


ALL_ERRORS: tuple[type[TmemError], ...] = (
    NoDevice,
    NoMemory,
    NoSpace,
    NotPermitted,
    InvalidArgument,
    BadAddress,
    NotImplementedOp,
    Frozen,
    Empty,
    StreamError,
)
