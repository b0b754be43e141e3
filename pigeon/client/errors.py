"""The SDK's exceptions: one base class that carries the gRPC status, a subclass per kind of
failure a caller handles differently.

The services send their errors as a gRPC status with a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (see ``pigeon.errors`` on the server side). The SDK reads the
``ErrorInfo`` reason and metadata and the ``RetryInfo`` delay from it with a few lines of wire
decoding instead of importing ``google.rpc``: the SDK depends on grpcio and protobuf only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, cast

import grpc

__all__ = [
    "ClientClosed",
    "ClientError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]

_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


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


def from_rpc_error(exc: grpc.RpcError) -> ClientError:
    """The SDK error for a failed call, with the reason, metadata and retry delay the server sent.

    Args:
        exc: What a grpc.aio call raised.

    Returns:
        The matching :class:`ClientError` subclass (the base class for codes without one).
    """
    code: grpc.StatusCode = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message: str = (exc.details() if hasattr(exc, "details") else None) or code.name
    reason, retry_after = "", 0.0
    metadata: dict[str, str] = {}
    # grpc-stubs types the trailer as opaque objects; at run time they are (key, value) pairs.
    trailer = cast(
        "Iterable[tuple[str, Any]]",
        (exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None) or (),
    )
    for key, value in trailer:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            # A malformed trailer: the code and message still say enough.
            with contextlib.suppress(IndexError, ValueError, UnicodeDecodeError):
                reason, metadata, retry_after = _decode_status(value)
    cls = _BY_CODE.get(code, ClientError)
    return cls(message, code=code, reason=reason, metadata=metadata, retry_after=retry_after)


# A minimal protobuf wire reader, enough for google.rpc.Status {details: repeated Any},
# Any {type_url, value}, ErrorInfo {reason, domain, metadata map} and RetryInfo {Duration}.


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varints, bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            yield number, data[pos : pos + length]
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")


def _decode_status(data: bytes) -> tuple[str, dict[str, str], float]:
    reason, retry_after = "", 0.0
    metadata: dict[str, str] = {}
    for number, detail in _fields(data):
        if number != 3 or not isinstance(detail, bytes):
            continue
        parts = dict(_fields(detail))
        type_url, value = parts.get(1, b""), parts.get(2, b"")
        if not isinstance(type_url, bytes) or not isinstance(value, bytes):
            continue
        if type_url.decode() == _ERROR_INFO:
            for field, item in _fields(value):
                if field == 1 and isinstance(item, bytes):
                    reason = item.decode()
                elif field == 3 and isinstance(item, bytes):
                    entry = dict(_fields(item))
                    key, text = entry.get(1, b""), entry.get(2, b"")
                    if isinstance(key, bytes) and isinstance(text, bytes):
                        metadata[key.decode()] = text.decode()
        elif type_url.decode() == _RETRY_INFO:
            for field, item in _fields(value):
                if field == 1 and isinstance(item, bytes):
                    duration = dict(_fields(item))
                    seconds, nanos = duration.get(1, 0), duration.get(2, 0)
                    if isinstance(seconds, int) and isinstance(nanos, int):
                        retry_after = seconds + nanos / 1e9
    return reason, metadata, retry_after
