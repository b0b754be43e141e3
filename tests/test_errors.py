"""The error catalogue: rich statuses on a real gRPC round trip, and back into exceptions."""

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from google.rpc import (  # type: ignore[import-untyped, unused-ignore]
    error_details_pb2,
    status_pb2,
)
from grpc_status import rpc_status

import pigeon.client.errors
from pigeon.errors import (
    DETAILS_METADATA_KEY,
    ERROR_DOMAIN,
    ConfigError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PigeonError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    abort,
    from_rpc_error,
    rich_status,
)

SERVICE = "pigeon.test.Errors"

# What the test server raises, by request payload.
ERRORS: dict[bytes, PigeonError] = {
    b"rate": ResourceExhausted("too many sends", retry_after=1.5, limit="100"),
    b"invalid": InvalidArgument("title is too long", reason="TITLE_TOO_LONG", limit="1024"),
    b"unauthenticated": Unauthenticated("token expired", reason="TOKEN_EXPIRED"),
    b"denied": PermissionDenied("not your inbox"),
    b"not_found": NotFound("no message 7", message_id="7"),
    b"unavailable": Unavailable("no healthy node"),
    b"deadline": DeadlineExceeded("store did not answer in time"),
    b"internal": Internal("broken invariant"),
    b"unicode": InvalidArgument("名字 is not a valid title: ∅"),
}


def _status_bytes(code: grpc.StatusCode, message: str, *details: tuple[str, bytes]) -> bytes:
    status = status_pb2.Status(code=code.value[0], message=message)
    for name, value in details:
        status.details.add(type_url=f"type.googleapis.com/google.rpc.{name}", value=value)
    data: bytes = status.SerializeToString()
    return data


_RETRY_2S = error_details_pb2.RetryInfo()
_RETRY_2S.retry_delay.FromSeconds(2)

# Trailers a broken or hostile peer may send, by request payload: (code, message, trailer).
BAD_TRAILERS: dict[bytes, tuple[grpc.StatusCode, str, bytes]] = {
    b"not_protobuf": (grpc.StatusCode.INVALID_ARGUMENT, "title is too long", b"\xff\xff\xff"),
    b"truncated": (grpc.StatusCode.INVALID_ARGUMENT, "title is too long", b"\x1a\x05ab"),
    b"empty": (grpc.StatusCode.INVALID_ARGUMENT, "title is too long", b""),
    # A valid Status that disagrees with the call: its details describe some other error.
    b"other_status": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "title is too long",
        _status_bytes(
            grpc.StatusCode.NOT_FOUND,
            "no such title",
            ("ErrorInfo", error_details_pb2.ErrorInfo(reason="SPOOFED").SerializeToString()),
        ),
    ),
    # A valid Status whose ErrorInfo does not parse: the RetryInfo beside it still counts.
    b"bad_detail": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many sends",
        _status_bytes(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too many sends",
            ("ErrorInfo", b"\xff\xff\xff"),
            ("RetryInfo", _RETRY_2S.SerializeToString()),
        ),
    ),
}


def _unpack(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo | None, float | None]:
    info = retry = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            message = error_details_pb2.RetryInfo()
            detail.Unpack(message)
            retry = message.retry_delay.ToNanoseconds() / 1e9
    return info, retry


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    """A real grpc.aio server on a free port whose one method aborts with ERRORS[request]."""

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if request == b"plain":
            # A status without rich details, as gRPC itself or a proxy would send.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection refused")
        if request in BAD_TRAILERS:
            code, message, trailer = BAD_TRAILERS[request]
            await context.abort(code, message, ((DETAILS_METADATA_KEY, trailer),))
        await abort(context, ERRORS[request])

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Fail": grpc.unary_unary_rpc_method_handler(fail)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            yield chan
    finally:
        await server.stop(None)


async def _call(
    channel: grpc.aio.Channel, payload: bytes, method: str = "Fail"
) -> grpc.aio.AioRpcError:
    # No serializers: requests and responses are raw bytes, so no proto is needed.
    call = channel.unary_unary(f"/{SERVICE}/{method}", None, None)(payload, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


@pytest.mark.integration
async def test_client_sees_resource_exhausted_with_error_info_and_retry_info(channel):
    exc = await _call(channel, b"rate")

    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.details() == "too many sends (retry after 1.5s)"
    # grpcio-status's own reader, which also checks that code and message agree with the trailer.
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]  # an AioRpcError is a Call
    assert status is not None
    info, retry = _unpack(status)
    assert info is not None
    assert info.reason == "RESOURCE_EXHAUSTED"
    assert info.domain == ERROR_DOMAIN
    assert dict(info.metadata) == {"limit": "100"}
    assert retry == pytest.approx(1.5)


@pytest.mark.integration
async def test_rich_status_is_readable_with_the_async_helper_on_the_call(channel):
    call = channel.unary_unary(f"/{SERVICE}/Fail", None, None)(b"rate", timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    status = await rpc_status.aio.from_call(call)  # type: ignore[attr-defined]
    assert status is not None
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


@pytest.mark.integration
async def test_from_rpc_error_rebuilds_resource_exhausted_with_its_delay(channel):
    err = from_rpc_error(await _call(channel, b"rate"))

    assert type(err) is ResourceExhausted
    assert err.retry_after == pytest.approx(1.5)
    # The suffix is not appended a second time when the error is rebuilt.
    assert err.message == "too many sends (retry after 1.5s)"
    assert err.reason == "RESOURCE_EXHAUSTED"
    assert err.metadata == {"limit": "100"}


@pytest.mark.integration
@pytest.mark.parametrize("payload", [key for key in ERRORS if key != b"rate"])
async def test_every_error_survives_the_round_trip(channel, payload):
    sent = ERRORS[payload]
    exc = await _call(channel, payload)

    assert exc.code() == sent.code
    received = from_rpc_error(exc)
    assert type(received) is type(sent)
    assert received.message == sent.message
    assert received.reason == sent.reason
    assert received.metadata == sent.metadata


@pytest.mark.integration
async def test_status_without_details_maps_to_subclass_with_default_reason(channel):
    err = from_rpc_error(await _call(channel, b"plain"))

    assert type(err) is Unavailable
    assert err.reason == "UNAVAILABLE"
    assert err.message == "connection refused"
    assert err.metadata == {}


@pytest.mark.integration
async def test_code_without_subclass_maps_to_base_error_keeping_the_code(channel):
    err = from_rpc_error(await _call(channel, b"", method="NoSuchMethod"))

    assert type(err) is PigeonError
    assert err.code == grpc.StatusCode.UNIMPLEMENTED
    assert err.reason == "UNIMPLEMENTED"


@pytest.mark.integration
@pytest.mark.parametrize("payload", list(BAD_TRAILERS))
async def test_a_bad_details_trailer_still_gives_the_calls_code_and_message(channel, payload):
    code, message, _ = BAD_TRAILERS[payload]
    exc = await _call(channel, payload)

    server_side = from_rpc_error(exc)
    assert server_side.code == code
    assert server_side.message == message
    assert server_side.reason == code.name
    assert server_side.metadata == {}
    sdk = pigeon.client.errors.from_rpc_error(exc)
    assert sdk.code == code
    assert sdk.message == message
    assert sdk.reason == code.name
    assert sdk.metadata == {}
    if payload == b"bad_detail":
        assert type(server_side) is ResourceExhausted
        assert server_side.retry_after == 2.0
        assert type(sdk) is pigeon.client.errors.ResourceExhausted
        assert sdk.retry_after == 2.0
    else:
        assert type(server_side) is InvalidArgument
        assert type(sdk) is pigeon.client.errors.InvalidArgument


@pytest.mark.integration
async def test_the_status_read_keeps_every_detail_the_server_sent(channel):
    got = pigeon.client.errors.received_status(await _call(channel, b"rate"))

    assert got.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert got.message == "too many sends (retry after 1.5s)"
    assert (got.reason, got.metadata, got.retry_after) == (
        "RESOURCE_EXHAUSTED",
        {"limit": "100"},
        1.5,
    )
    assert got.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info, retry = _unpack(got.status)
    assert info is not None and info.domain == ERROR_DOMAIN
    assert retry == pytest.approx(1.5)


@pytest.mark.unit
def test_rich_status_of_plain_error_has_error_info_but_no_retry_info():
    status = rich_status(NotFound("no message 7", message_id="7"))

    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert status.message == "no message 7"
    info, retry = _unpack(status)
    assert info is not None and info.reason == "NOT_FOUND"
    assert dict(info.metadata) == {"message_id": "7"}
    assert retry is None


@pytest.mark.unit
def test_metadata_values_are_kept_as_strings_even_when_given_otherwise():
    err = InvalidArgument("too many recipients", limit=1000)  # type: ignore[arg-type]
    assert err.metadata == {"limit": "1000"}
    assert rich_status(err).message == "too many recipients"


@pytest.mark.unit
def test_config_error_names_its_key_in_attribute_and_metadata():
    err = ConfigError("unknown setting PIGEON_PROT", key="PIGEON_PROT")

    assert err.key == "PIGEON_PROT"
    assert err.metadata["key"] == "PIGEON_PROT"
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(err, PigeonError)
    assert str(err) == "unknown setting PIGEON_PROT"


@pytest.mark.unit
def test_retry_hint_is_left_out_of_the_message_when_there_is_none():
    assert ResourceExhausted("queue full", retry_after=0).message == "queue full"
