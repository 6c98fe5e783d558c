"""Storage failures sorted into final and retryable, for every storage user (work dir, remote data).

A location that can never work (no such bucket, access denied, no credentials, an invalid URL, a path
under a file) is a :class:`StorageError` (final, exit 2); everything else (timeouts, refused or reset
connections, 5xx/SlowDown, a full disk) is a :class:`StorageUnavailableError` (retryable, exit 75).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from types import ModuleType

from ..errors import StorageError, StorageUnavailableError


def storage_errors() -> tuple[type[BaseException], ...]:
    """What the storage libraries raise when storage fails (as opposed to a bug in the caller): OS errors,
    and aiohttp's and botocore's own errors (s3fs's; not OSErrors) once those libraries are loaded.

    Looked up in ``sys.modules`` rather than imported: neither library can raise before it is loaded, and
    importing them costs ~0.2 s in every process that only touches local files (the supervisor).
    """
    errors: tuple[type[BaseException], ...] = (OSError,)
    aiohttp_error = getattr(sys.modules.get("aiohttp"), "ClientError", None)
    if aiohttp_error is not None:
        errors += (aiohttp_error,)
    boto = _boto_errors()
    return errors + ((boto.BotoCoreError,) if boto is not None else ())


def _boto_errors() -> ModuleType | None:
    """botocore's exception module when botocore is loaded (what :func:`storage_errors` explains)."""
    boto = sys.modules.get("botocore.exceptions")
    return boto if hasattr(boto, "BotoCoreError") else None


STORAGE_FAILURES = (StorageError, StorageUnavailableError)
"""What :class:`WorkDir` raises when storage fails: final or retryable."""

_FINAL_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                           errno.ENAMETOOLONG, errno.EINVAL, errno.ELOOP, errno.EEXIST})
"""OS errors that no retry can fix: a missing bucket or directory, access denied, an invalid name."""

_FINAL_BOTO = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
               "ParamValidationError", "NoRegionError", "InvalidRegionError", "ProfileNotFound",
               "InvalidEndpointConfigurationError", "InvalidS3AddressingStyleError", "UnknownSignatureVersionError",
               "InvalidConfigError", "UnknownEndpointError")
"""botocore errors that mean "this configuration can never work" (the others are network trouble)."""
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")


def is_final(error: BaseException) -> bool:
    """Whether a storage failure can never go away by retrying (see the module docstring)."""
    if isinstance(error, STORAGE_FAILURES):
        return isinstance(error, StorageError)
    boto = _boto_errors()
    if boto is not None and isinstance(error, boto.BotoCoreError):
        return _is_one_of(error, _FINAL_BOTO)
    if isinstance(error, (TimeoutError, ConnectionError)):
        return False
    if isinstance(error, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
                          FileExistsError)):
        return True
    if isinstance(error, OSError) and error.errno in _FINAL_ERRNOS:
        return True
    cause = error.__cause__
    if cause is not None and cause is not error and boto is not None and isinstance(cause, boto.BotoCoreError):
        return is_final(cause)
    return False


def lacks_credentials(error: BaseException) -> bool:
    """Whether botocore found no (or partial) credentials for the request."""
    return _is_one_of(error, _NO_CREDENTIALS)


def _is_one_of(error: BaseException, class_names: tuple[str, ...]) -> bool:
    """Whether ``error`` is an instance of a class of one of these names (botocore's, matched without
    importing botocore)."""
    return any(cls.__name__ in class_names for cls in type(error).__mro__)


def cut_mid_body(error: BaseException) -> bool:
    """Whether a read failed because the answer's body was cut off (a reset), not by a timeout."""
    seen = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, TimeoutError):
            return False
        if isinstance(cause, ConnectionResetError) or type(cause).__name__ in _CUT_BODY:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


_CUT_BODY = frozenset({"ClientPayloadError", "ContentLengthError", "ResponseStreamingError", "IncompleteReadError"})


def storage_error(message: str, error: BaseException, reason: str = "") -> StorageError | StorageUnavailableError:
    """``message: reason`` as a :class:`StorageError` (final) or :class:`StorageUnavailableError`
    (retryable), by :func:`is_final` of ``error``."""
    reason = reason or describe_error(error)
    if is_final(error):
        return StorageError(f"{message}: {reason}")
    return StorageUnavailableError(f"{message}: {reason} (the store is failing for now: retryable)")


def describe_error(error: BaseException) -> str:
    """A one-line cause, with the root OS-level reason (e.g. connection refused) when there is one."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    seen = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return f"{text} (connection refused)"
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, OSError) and error.errno and os.strerror(error.errno) not in text:
        return f"{text} ({os.strerror(error.errno)})"
    return text


@contextlib.contextmanager
def classified(what: str) -> Iterator[None]:
    """Turn a storage library's failure inside the block into :class:`StorageError` (final) or
    :class:`StorageUnavailableError` (retryable) headed ``what``; ``FileNotFoundError`` and failures already
    classified pass through unchanged."""
    try:
        yield
    except (FileNotFoundError, *STORAGE_FAILURES):
        raise
    except storage_errors() as e:
        raise storage_error(what, e) from e
