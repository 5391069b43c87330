"""One error type for everything the control plane refuses: an errno plus a message a person can act on."""

import errno as _errno


class HdslbError(Exception):
    """Raised by model/command code; carried over the control socket as (errno, message)."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err
        self.message = message

    def __str__(self) -> str:
        return self.message


def invalid(msg: str) -> HdslbError:
    return HdslbError(_errno.EINVAL, msg)


def exists(msg: str) -> HdslbError:
    return HdslbError(_errno.EEXIST, msg)


def notfound(msg: str) -> HdslbError:
    return HdslbError(_errno.ENOENT, msg)


def nospace(msg: str) -> HdslbError:
    return HdslbError(_errno.ENOSPC, msg)
