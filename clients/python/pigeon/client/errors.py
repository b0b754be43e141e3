"""The SDK's exceptions: one base class that carries the gRPC status, a subclass per kind of
failure a caller handles differently.

The services send their errors as a gRPC status with a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (see ``pigeon.errors`` on the server side).
:func:`received_status` reads it with grpcio-status, once for the SDK and for the services (which
rebuild their own exceptions, and the REST gateway's JSON errors, from the same reading).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import cast

import grpc
from google.protobuf import message as protobuf_message

# googleapis-common-protos ships .pyi stubs but no py.typed marker; "unused-ignore" keeps this
# line clean whether or not mypy is told to follow them.
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

__all__ = [
    "ClientClosed",
    "ClientError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ReceivedStatus",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "received_status",
]


class ClientError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        code: The gRPC status code (``grpc.StatusCode.UNAVAILABLE``...).
        message: What went wrong, as the server (or the SDK) said it.
        reason: A stable UPPER_SNAKE identifier to branch on (``TOKEN_EXPIRED``,
            ``BODY_TOO_LARGE``...); the code's name when the server sent none.
        metadata: Structured fields sent with the error (``field``, ``limit``...).
        retry_after: Seconds the server asked the caller to wait before retrying; 0 if it did not
            say.

    Example:
        .. code-block:: python

            try:
                await client.send("bob", "")
            except InvalidArgument as err:
                print(err.reason, err.metadata.get("field"))
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_after: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.reason = reason or self.code.name
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.message!r}, code={self.code.name}, reason={self.reason!r})"


class InvalidArgument(ClientError):
    """The request is wrong (empty body, too many recipients, bad cursor); retrying it unchanged
    fails again. Also raised for FAILED_PRECONDITION and OUT_OF_RANGE."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ClientError):
    """The token is missing, malformed, forged or expired."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ClientError):
    """The credential is valid but does not allow this (e.g. a user token where an API key is
    needed)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ClientError):
    """The message (or other object) does not exist in the caller's inbox."""

    default_code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ClientError):
    """A limit or rate was passed; see ``retry_after``."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ClientError):
    """The cluster could not be reached, or did not answer in time, even after the retries the
    SDK makes. Also raised for DEADLINE_EXCEEDED."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ClientClosed(ClientError):
    """The client was closed (or never opened) when the call was made."""

    default_code = grpc.StatusCode.CANCELLED


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.CANCELLED: ClientClosed,
}


@dataclass(frozen=True)
class ReceivedStatus:
    """What a failed call said: its status and the rich details the server sent with it.

    Attributes:
        code: The call's gRPC status code.
        message: The call's status message; empty when it had none.
        reason: ``ErrorInfo.reason``; empty when the server sent none.
        metadata: ``ErrorInfo.metadata``; empty when the server sent none.
        retry_after: ``RetryInfo.retry_delay`` in seconds; 0 when the server sent none.
        status: The ``google.rpc.Status`` received, every detail included; one with the call's
            code and message only when the trailer was missing, malformed or disagreed with them.
    """

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: float = 0.0
    status: status_pb2.Status = field(default_factory=status_pb2.Status)


def received_status(exc: grpc.RpcError) -> ReceivedStatus:
    """Read the status a call failed with, and its ``ErrorInfo`` and ``RetryInfo`` if any.

    Args:
        exc: What a call raised, normally a ``grpc.aio.AioRpcError``.

    Returns:
        The reading; a trailer that is not a valid ``google.rpc.Status``, or whose code or message
        disagrees with the call's, counts as no details (a peer's garbage must not hide the code
        and message, which still say enough).
    """
    code: grpc.StatusCode = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message: str = (exc.details() if hasattr(exc, "details") else None) or ""
    status: status_pb2.Status | None = None
    if hasattr(exc, "trailing_metadata"):
        # An AioRpcError has the sync Call's code(), details() and trailing_metadata(); the stubs
        # do not say so. from_call raises ValueError when the trailer disagrees with the call.
        with contextlib.suppress(ValueError, protobuf_message.DecodeError):
            status = rpc_status.from_call(cast("grpc.Call", exc))
    if status is None:
        status = status_pb2.Status(code=code.value[0], message=message)
    reason, retry_after = "", 0.0
    metadata: dict[str, str] = {}
    for detail in status.details:
        # A detail that does not parse is skipped; the others still count.
        with contextlib.suppress(protobuf_message.DecodeError):
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return ReceivedStatus(code, message, reason, metadata, retry_after, status)


def from_rpc_error(exc: grpc.RpcError) -> ClientError:
    """The SDK error for a failed call, with the reason, metadata and retry delay the server sent.

    Args:
        exc: What a grpc.aio call raised.

    Returns:
        The matching :class:`ClientError` subclass (the base class for codes without one).
    """
    got = received_status(exc)
    cls = _BY_CODE.get(got.code, ClientError)
    return cls(
        got.message or got.code.name,
        code=got.code,
        reason=got.reason,
        metadata=got.metadata,
        retry_after=got.retry_after,
    )
