"""Checks of what callers send a node, each failing with a message that says what to fix."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pigeon.errors import InvalidArgument
from pigeon.ids import MAX_NAME_LENGTH, name_problem

__all__ = ["MAX_SEQ", "Limits", "Outgoing", "decode_page_token", "encode_page_token"]

MAX_ID_LENGTH = MAX_NAME_LENGTH
# Stores keep seqs as signed 64-bit integers; anything larger cannot name a real message.
MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """The node's limits on what one request may carry."""

    max_body_bytes: int = 65536
    max_title_bytes: int = 1024
    max_metadata_bytes: int = 8192
    max_recipients: int = 1000
    max_page_size: int = 200
    max_batch: int = 256
    default_page_size: int = 50


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One validated message to store: a Draft (from a user) or a Publication (from a system)."""

    to: tuple[str, ...]
    title: str
    body: str
    metadata: Mapping[str, str]
    idempotency_key: str = ""
    broadcast: bool = False
    source: str = ""


def _size(text: str) -> int:
    """UTF-8 bytes; isascii() is O(1) in CPython, and most text is ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _fine_id(value: str) -> bool:
    """check_id's test without building an error."""
    return bool(value) and len(value) <= MAX_ID_LENGTH and name_problem(value) is None


def check_id(value: str, what: str) -> str:
    """A user id, message id or source name: 1 to 128 characters, none of them invisible (see
    :func:`pigeon.ids.name_problem`)."""
    if not value:
        raise InvalidArgument(f"{what} must not be empty", reason="EMPTY_ID", field=what)
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}",
            reason="ID_TOO_LONG",
            field=what,
        )
    problem = name_problem(value)
    if problem is not None:
        raise InvalidArgument(
            f"{what} {problem}: ids may not hold control characters, invisible format characters "
            "or separators, nor start or end with a space",
            reason="BAD_ID",
            field=what,
        )
    return value


def check_outgoing(
    limits: Limits,
    *,
    to: Sequence[str],
    title: str,
    body: str,
    metadata: Mapping[str, str],
    idempotency_key: str,
    broadcast: bool = False,
    source: str = "",
    sender: str = "",
    where: str = "",
) -> Outgoing:
    """Validate one message; `where` prefixes field names in errors (e.g. "batch[3].")."""
    if broadcast:
        if to:
            raise InvalidArgument(
                f"{where}to must be empty when broadcast is set",
                reason="BROADCAST_WITH_RECIPIENTS",
                field=f"{where}to",
            )
        recipients: tuple[str, ...] = ()
    else:
        if not to:
            raise InvalidArgument(
                f"{where}to: at least one recipient is required (or set broadcast)"
                if source or not sender
                else f"{where}to: at least one recipient is required",
                reason="NO_RECIPIENTS",
                field=f"{where}to",
            )
        # Counted before duplicates collapse too: a list far over the limit costs no more than
        # one at it.
        if len(to) > 2 * limits.max_recipients:
            raise InvalidArgument(
                f"{where}to has {len(to)} entries; the limit is {limits.max_recipients} recipients",
                reason="TOO_MANY_RECIPIENTS",
                field=f"{where}to",
                limit=str(limits.max_recipients),
            )
        # Repeated ids collapse: a user gets one copy.
        recipients = tuple(dict.fromkeys(to))
        # Counted before each id is checked: a list far over the limit costs no more.
        if len(recipients) > limits.max_recipients:
            raise InvalidArgument(
                f"{where}to has {len(recipients)} recipients; the limit is {limits.max_recipients}",
                reason="TOO_MANY_RECIPIENTS",
                field=f"{where}to",
                limit=str(limits.max_recipients),
            )
        for user in recipients:
            if not _fine_id(user):
                check_id(user, f"{where}to")
        if sender and sender in recipients:
            raise InvalidArgument(
                f"{where}to: you cannot send a message to yourself ({sender})",
                reason="SEND_TO_SELF",
                field=f"{where}to",
            )
    if not body:
        raise InvalidArgument(
            f"{where}body must not be empty", reason="EMPTY_BODY", field=f"{where}body"
        )
    # Field names are built only for an error: this runs for every message.
    if (size := _size(body)) > limits.max_body_bytes:
        _check_size(f"{where}body", size, limits.max_body_bytes, "BODY_TOO_LARGE")
    if (size := _size(title)) > limits.max_title_bytes:
        _check_size(f"{where}title", size, limits.max_title_bytes, "TITLE_TOO_LARGE")
    # One pass over the map (a protobuf map iterates slowly): its size, empty keys, a copy.
    copied: dict[str, str] = {}
    metadata_size = 0
    for key, value in metadata.items():
        metadata_size += _size(key) + _size(value)
        copied[key] = value
    if metadata_size > limits.max_metadata_bytes:
        _check_size(
            f"{where}metadata", metadata_size, limits.max_metadata_bytes, "METADATA_TOO_LARGE"
        )
    if "" in copied:
        raise InvalidArgument(
            f"{where}metadata keys must not be empty",
            reason="BAD_METADATA",
            field=f"{where}metadata",
        )
    if idempotency_key:
        check_id(idempotency_key, f"{where}idempotency_key")
    if source:
        check_id(source, f"{where}source")
    return Outgoing(recipients, title, body, copied, idempotency_key, broadcast, source)


def _check_size(field: str, size: int, limit: int, reason: str) -> None:
    if size > limit:
        raise InvalidArgument(
            f"{field} is {size} bytes; the limit is {limit}",
            reason=reason,
            field=field,
            limit=str(limit),
        )


def check_batch(single_set: bool, batch: Iterable[object], limit: int) -> None:
    """A request carries one message or a batch, not both, and not an empty batch."""
    size = sum(1 for _ in batch)
    if size and single_set:
        raise InvalidArgument(
            "set either the message fields or batch, not both",
            reason="BATCH_AND_SINGLE",
            field="batch",
        )
    if size > limit:
        raise InvalidArgument(
            f"batch has {size} messages; the limit is {limit}",
            reason="BATCH_TOO_LARGE",
            field="batch",
            limit=str(limit),
        )


def check_page_size(requested: int, limits: Limits) -> int:
    """0 means the default (never more than the limit); above the limit is an error, not a
    silent cut."""
    if requested == 0:
        return min(limits.default_page_size, limits.max_page_size)
    if requested > limits.max_page_size:
        raise InvalidArgument(
            f"page_size {requested} is over the limit of {limits.max_page_size}",
            reason="PAGE_SIZE_TOO_LARGE",
            field="page_size",
            limit=str(limits.max_page_size),
        )
    return requested


def encode_page_token(inbox_before: int, broadcast_before: int) -> str:
    """An opaque cursor: the next page holds inbox seqs and broadcast seqs below these."""
    raw = f"v1:{inbox_before}:{broadcast_before}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[int | None, int | None]:
    """(inbox_before, broadcast_before): None reads from the newest, 1 means nothing is left."""
    if not token:
        return None, None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, inbox, broadcast = raw.split(":")
        if version != "v1":
            raise ValueError(version)
        bounds = int(inbox), int(broadcast)
        if min(bounds) < 0 or max(bounds) > MAX_SEQ:
            raise ValueError(bounds)
        return bounds[0] or None, bounds[1] or None
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(
            "page_token is not a token returned by ListMessages",
            reason="BAD_PAGE_TOKEN",
            field="page_token",
        ) from exc
