"""The one exception hierarchy and error catalogue of Pigeon.

Every error that Pigeon code raises on purpose is a :class:`PigeonError`. Its subclass fixes the
gRPC status code; its ``reason`` is a stable UPPER_SNAKE identifier that programs can branch on
(the message is for people and may change); its ``metadata`` carries structured fields such as the
name of the bad argument or the limit that was passed.

On the wire an error travels as a gRPC status with a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (the "richer error model" that grpc-gateway, grpcurl and the
Google API clients understand). The status carries a ``google.rpc.ErrorInfo`` with the reason,
``domain="pigeon.v1"`` and the metadata, plus a ``google.rpc.RetryInfo`` for
:class:`ResourceExhausted`. :func:`abort` sends it from a servicer; :func:`from_rpc_error` turns a
received status back into the matching subclass, so a client or the Gate forwarding a call can
re-raise exactly what the server raised.

Foreign exceptions (grpc, sqlite3, pymongo, aetcd) are converted where they enter Pigeon code with
``raise SomePigeonError(...) from exc``.
"""

from typing import Any, NoReturn

import grpc
import grpc.aio

# googleapis-common-protos ships .pyi stubs but no py.typed marker, so mypy skips them unless the
# project sets follow_untyped_imports for google.rpc.*; "unused-ignore" keeps this line clean both
# before and after that setting is added.
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from pigeon.client.errors import received_status

__all__ = [
    "DETAILS_METADATA_KEY",
    "ERROR_DOMAIN",
    "ConfigError",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PigeonError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "abort",
    "from_rpc_error",
    "rich_status",
]

ERROR_DOMAIN = "pigeon.v1"
"""The ``ErrorInfo.domain`` of every error Pigeon sends."""

DETAILS_METADATA_KEY = "grpc-status-details-bin"
"""The trailer that carries the serialized ``google.rpc.Status`` (same key as grpcio-status)."""


class PigeonError(Exception):
    """Base class of every error Pigeon raises on purpose.

    Attributes:
        code: The gRPC status code this error is sent with. Fixed per subclass; an error rebuilt by
            :func:`from_rpc_error` from a status that has no subclass of its own is a plain
            ``PigeonError`` whose ``code`` is that status.
        reason: Stable, machine-readable UPPER_SNAKE reason (``ErrorInfo.reason`` on the wire).
            Defaults to the subclass's generic reason; pass a specific one where callers may want to
            branch on it (``TOKEN_EXPIRED``, ``BODY_TOO_LARGE``...).
        message: Human-readable explanation that says what to fix.
        metadata: Structured fields (``ErrorInfo.metadata`` on the wire), e.g. ``field="title"``,
            ``limit="1024"``.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: str) -> None:
        """Create the error.

        Args:
            message: What went wrong and what to do about it.
            reason: Overrides the class's default reason.
            **metadata: Structured fields; values are sent as strings.
        """
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        # ErrorInfo.metadata is map<string, string>: coerce here so a stray int cannot make the
        # later abort() fail with a TypeError and turn a precise error into INTERNAL.
        self.metadata: dict[str, str] = {key: str(value) for key, value in metadata.items()}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        fields = "".join(f", {key}={value!r}" for key, value in self.metadata.items())
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r}{fields})"


class InvalidArgument(PigeonError):
    """The request is malformed or breaks a limit; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class Unauthenticated(PigeonError):
    """The caller presented no credential, or one that is not valid (bad, expired, forged)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(PigeonError):
    """The caller is known but may not do this (e.g. read another user's inbox)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotFound(PigeonError):
    """The addressed object (message, user, node) does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class ResourceExhausted(PigeonError):
    """A rate limit or quota was hit; the call may succeed after ``retry_after`` seconds.

    Attributes:
        retry_after: Seconds the caller should wait before retrying; ``0.0`` when the server gave
            no hint (for instance gRPC's own "message larger than max" error).
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        reason: str | None = None,
        **metadata: str,
    ) -> None:
        """Create the error.

        Args:
            message: What limit was hit.
            retry_after: Seconds to wait before retrying; added to the message so that a person
                reading only the status line (grpcurl, logs) sees it too.
            reason: Overrides the default reason.
            **metadata: Structured fields.
        """
        if retry_after > 0:
            message = f"{message} (retry after {retry_after:g}s)"
        super().__init__(message, reason=reason, **metadata)
        self.retry_after = float(retry_after)


class Unavailable(PigeonError):
    """A dependency or peer cannot be reached right now; retrying (elsewhere) may help."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(PigeonError):
    """The operation did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Internal(PigeonError):
    """A bug or broken invariant in Pigeon. Never used for bad input."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class ConfigError(PigeonError):
    """A configuration setting is unknown or has a bad value.

    Raised at start-up (and by constructors that receive settings), not sent over the wire as
    such; it uses INVALID_ARGUMENT so that a config error surfacing through an RPC (e.g. a bad
    value sent to an admin call) still maps to a sensible status.

    Attributes:
        key: The setting as the user spelled it where it is wrong: ``PIGEON_JWT_SECRT``,
            ``--port``, ``node.max_body_bytes``, or a field name for cross-field checks.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "BAD_CONFIG"

    def __init__(
        self, message: str, *, key: str, reason: str | None = None, **metadata: str
    ) -> None:
        """Create the error.

        Args:
            message: What is wrong and what is expected; should name the key.
            key: The bad setting as the user spelled it.
            reason: Overrides the default reason.
            **metadata: Structured fields.
        """
        super().__init__(message, reason=reason, key=key, **metadata)
        self.key = key


# The one table from status code to class. ConfigError is deliberately absent: INVALID_ARGUMENT on
# the wire is an InvalidArgument to whoever receives it.
_BY_CODE: dict[grpc.StatusCode, type[PigeonError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


def _code_number(code: grpc.StatusCode) -> int:
    # grpc.StatusCode values are (int, name) tuples; the proto carries the int.
    number: int = code.value[0]
    return number


def rich_status(err: PigeonError) -> status_pb2.Status:
    """Build the ``google.rpc.Status`` that describes ``err`` on the wire.

    Args:
        err: The error to describe.

    Returns:
        A status with the code, the message, an ``ErrorInfo`` (reason, ``domain="pigeon.v1"``,
        metadata) and, for :class:`ResourceExhausted`, a ``RetryInfo`` with the delay.
    """
    status = status_pb2.Status(code=_code_number(err.code), message=err.message)
    info = error_details_pb2.ErrorInfo(
        reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata
    )
    status.details.add().Pack(info)
    if isinstance(err, ResourceExhausted) and err.retry_after > 0:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(round(err.retry_after * 1e9))
        status.details.add().Pack(retry)
    return status


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: PigeonError) -> NoReturn:
    """End the current RPC with ``err``: its code, its message and its rich status.

    Args:
        context: The servicer context of the RPC to end.
        err: The error to send.

    Raises:
        grpc.aio.AbortError: Always (that is how grpc.aio ends the handler); do not catch it.
    """
    # What context.abort_with_status does, spelled with context.abort: the grpc.aio type stubs
    # know only that one.
    status = rpc_status.to_status(rich_status(err))
    await context.abort(status.code, status.details, status.trailing_metadata)


def from_rpc_error(exc: grpc.RpcError) -> PigeonError:
    """Turn a received gRPC error back into the matching :class:`PigeonError` subclass.

    The reason and metadata come from the ``ErrorInfo`` and the retry delay from the ``RetryInfo``
    when the server sent them (read by :func:`pigeon.client.errors.received_status`, shared with
    the SDK); an error without rich details (from gRPC itself, a proxy, a non-Pigeon server) or
    with a malformed trailer gets the subclass's default reason. Use it as
    ``raise from_rpc_error(exc) from exc``.

    Args:
        exc: The error a call raised, normally a ``grpc.aio.AioRpcError``.

    Returns:
        The rebuilt error; a plain :class:`PigeonError` carrying the received code for codes with no
        subclass (CANCELLED, UNKNOWN, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, DATA_LOSS).
    """
    got = received_status(exc)
    cls = _BY_CODE.get(got.code, PigeonError)
    # Bypass the subclass constructors: the message on the wire is already final (ResourceExhausted
    # would otherwise append "retry after" a second time).
    err = cls.__new__(cls)
    PigeonError.__init__(err, got.message, reason=got.reason or None, **got.metadata)
    if isinstance(err, ResourceExhausted):
        err.retry_after = got.retry_after
    if cls is PigeonError:
        err.code = got.code
        if not got.reason:
            err.reason = got.code.name
    return err
