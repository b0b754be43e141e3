"""One typed, validated configuration object per process.

Each service has a frozen dataclass (:class:`GateConfig`, :class:`NodeConfig`,
:class:`DispatcherConfig`) that extends :class:`CommonConfig`. :func:`load_config` fills one from,
highest precedence first:

1. command-line flags: ``--etcd-endpoints``, ``--port``, ``--node-id``... one per field;
2. environment variables: ``PIGEON_`` + the field name in upper case (``PIGEON_NODE_ID``);
3. an optional TOML file named by ``--config PATH`` or ``PIGEON_CONFIG``: common settings at the
   top level, each service's own settings in its table (``[gate]``, ``[node]``, ``[dispatcher]``).
   A table may also repeat a common setting for that service only (``[node] port = 7171``), so one
   file can describe a whole cluster on one machine;
4. the defaults below.

Anything Pigeon does not know is an error that names it, with a suggestion when one is close: an
unknown TOML key or table, an unknown ``PIGEON_*`` variable, an unknown flag, and a value of the
wrong type or out of range. Every table of the file is checked, whichever service reads it, so a
typo in ``[node]`` is reported by the Gate too. List settings are comma-separated in flags and the
environment and arrays in TOML; booleans accept true/false/1/0/yes/no.

Example:
    .. code-block:: python

        config = load_config(NodeConfig, prog="python -m node")
"""

import argparse
import dataclasses
import difflib
import functools
import ipaddress
import math
import os
import socket
import sys
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pigeon.errors import ConfigError
from pigeon.ids import parse_source_scope

# The parser the etcd client itself uses: an endpoint passes here exactly when it can be dialled.
from pigeon.registry import parse_endpoint

__all__ = [
    "ENV_PREFIX",
    "JWT_ALGORITHMS",
    "CommonConfig",
    "DispatcherConfig",
    "GateConfig",
    "NodeConfig",
    "build_parser",
    "env_var",
    "known_env_vars",
    "load_config",
    "reference_markdown",
]

ENV_PREFIX = "PIGEON_"
"""Prefix of every Pigeon environment variable."""

_CONFIG_ENV = "PIGEON_CONFIG"
_CONFIG_FLAG = "--config"

# PIGEON_* variables that are read somewhere other than a settings dataclass. Every service
# rejects unknown PIGEON_* variables, and `pigeon up` passes its environment on to the services it
# starts, so a variable read by the CLI or the SDK must be listed here or the services refuse it.
_OTHER_ENV_VARS = frozenset({_CONFIG_ENV, "PIGEON_GATE", "PIGEON_TOKEN", "PIGEON_PARENT_PID"})

JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
"""The JWT algorithms a user token may be configured to use. Never ``none``."""

T = TypeVar("T", bound="CommonConfig")
_Check = Callable[[Any], str | None]


def _rules(
    help: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    nonempty: bool = False,
    check: _Check | None = None,
) -> dict[str, Any]:
    """The ``field(metadata=...)`` of a setting: its help text and the rules its value follows."""
    return {
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "positive": positive,
        "nonempty": nonempty,
        "check": check,
    }


def _check_etcd_prefix(value: str) -> str | None:
    # Without the trailing slash a prefix watch on "/pigeon" would also see "/pigeon-staging/...".
    if not value.endswith("/"):
        return f"must end with '/', got {value!r}"
    return None


def _check_mongodb_uri(value: str) -> str | None:
    if not value.startswith(("mongodb://", "mongodb+srv://")):
        return "must start with mongodb:// or mongodb+srv://"
    return None


def _check_algorithm(value: str) -> str | None:
    if value.lower() == "none":
        return "'none' (unsigned tokens) is never allowed"
    return None


def _check_etcd_endpoint(value: str) -> str | None:
    # Caught here, a typo is one line and exit 2; left to the registry, it was a traceback.
    try:
        _, port = parse_endpoint(value)
    except ValueError:
        port = 0
    if port == 0:
        return f"{value!r} is not host:port with a port from 1 to 65535 (e.g. 127.0.0.1:2379)"
    return None


def _check_network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        return f"{value!r} is not an IP address or network (e.g. 10.0.0.0/8)"
    return None


def _check_source_scope(value: str) -> str | None:
    try:
        parse_source_scope(value)
    except ValueError as exc:
        return str(exc)
    return None


# Below this a refused caller would be told to wait so long that the wait itself overflows
# (RetryInfo holds at most ~10,000 years), and a limit that low is a typo for 0 anyway.
_MIN_RATE = 0.01


def _check_rate(value: float) -> str | None:
    if 0 < value < _MIN_RATE:
        return f"must be 0 (no limit) or at least {_MIN_RATE:g}, got {_number(value)}"
    return None


def _number(value: float) -> str:
    """A bound or value for an error message: 2592000 rather than 2.592e+06, and no overflow on
    an integer too long for a float."""
    if isinstance(value, int):
        digits = str(abs(value))
        return str(value) if len(digits) <= 15 else f"a {len(digits)}-digit number"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


# The rate limiter keeps each bucket as a float: a bigger burst is no limit at all, and a huge
# one would not even convert.
_MAX_BURST = 1_000_000


def _heartbeat_rules(help: str) -> dict[str, Any]:
    # Each heartbeat is a write to every idle stream, and its interval is announced to clients as
    # a protobuf Duration: more often than every second only burns CPU, and rarer than hourly is
    # no keep-alive (and a huge one cannot even be announced).
    return _rules(f"{help}, seconds (1 to 3600)", positive=True, minimum=1, maximum=3600)


_GRPC_PORT = _rules("gRPC listen port; 0 picks a free port", minimum=0, maximum=65535)
_HTTP_PORT = _rules(
    "HTTP listen port (REST, web page, health); 0 picks a free port", minimum=0, maximum=65535
)


def _check_listen_address(value: str) -> str | None:
    if not value:
        return None
    host, colon, port = value.rpartition(":")
    if not colon or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        return f"{value!r} is not host:port with a port from 0 to 65535 (e.g. 127.0.0.1:9071)"
    return None


def _metrics_address(port: int) -> Any:
    # Loopback by default: the metrics show failure reasons, placements and counts, which are
    # for the operator's scraper, not for whoever reaches the public port.
    return field(
        default=f"127.0.0.1:{port}",
        metadata=_rules(
            "host:port of the ops HTTP listener that serves Prometheus /metrics (and /healthz); "
            "loopback by default, port 0 picks a free port, empty turns it off. The public HTTP "
            "port answers /metrics with 404",
            check=_check_listen_address,
        ),
    )


def _check_etcd_credentials(config: "CommonConfig") -> None:
    """The etcd_* settings that go in pairs are set in pairs, and their files can be read."""
    for one, other, what in (
        ("etcd_cert", "etcd_key", "a client certificate needs its key"),
        ("etcd_user", "etcd_password", "etcd authentication needs a user and a password"),
    ):
        if bool(getattr(config, one)) != bool(getattr(config, other)):
            present, missing = (one, other) if getattr(config, one) else (other, one)
            raise ConfigError(
                f"{present} is set but {missing} is not: {what} (set {env_var(missing)} or "
                f"{_flag(missing)}, or unset {present})",
                key=missing,
            )
    for name in ("etcd_ca", "etcd_cert", "etcd_key"):
        path = getattr(config, name)
        if path and not os.access(path, os.R_OK):
            reason = "no such file" if not os.path.exists(path) else "not readable"
            raise ConfigError(f"bad value for {name}: {path!r}: {reason}", key=name)


# Secrets are declared with repr=False: configs get logged at start-up and show up in tracebacks.


@dataclass(frozen=True, kw_only=True)
class CommonConfig:
    """Settings every Pigeon service has.

    Construct it (or a subclass) directly in tests; every value is checked either way.

    Attributes:
        section: The TOML table that holds this service's own settings (empty for the common part).
    """

    section: ClassVar[str] = ""

    etcd_endpoints: list[str] = field(
        default_factory=lambda: ["127.0.0.1:2379"],
        metadata=_rules(
            "etcd endpoints as host:port, comma-separated; on a failure, or when the member in"
            " use has lost its leader, the next one is used",
            nonempty=True,
            check=_check_etcd_endpoint,
        ),
    )
    etcd_prefix: str = field(
        default="/pigeon/",
        metadata=_rules(
            "key prefix of this cluster in etcd; clusters sharing an etcd need different prefixes",
            nonempty=True,
            check=_check_etcd_prefix,
        ),
    )
    etcd_timeout: float = field(
        default=2.0,
        metadata=_rules(
            "timeout of each etcd request, seconds (0.1 to 60)",
            positive=True,
            minimum=0.1,
            maximum=60,
        ),
    )
    lease_ttl: int = field(
        default=5,
        metadata=_rules(
            "TTL of the etcd lease behind this process's registration, seconds (2 to 3600); a "
            "crashed process leaves the cluster this long after its last keep-alive",
            minimum=2,
            # Unbounded, a TTL over etcd's limit failed only at start as "cannot register in
            # etcd"; and a crashed process lingering in every view for over an hour helps no one.
            maximum=3600,
        ),
    )
    etcd_ca: str = field(
        default="",
        metadata=_rules(
            "PEM file of the CA that signed etcd's server certificate; setting it turns TLS on "
            "for etcd (so does etcd_cert alone, verifying against the system's trusted roots)"
        ),
    )
    etcd_cert: str = field(
        default="",
        metadata=_rules(
            "PEM client certificate presented to etcd (for its --client-cert-auth); set "
            "together with etcd_key"
        ),
    )
    etcd_key: str = field(
        default="", metadata=_rules("PEM private key of etcd_cert; set together with etcd_cert")
    )
    etcd_user: str = field(
        default="",
        metadata=_rules(
            "etcd user name, for an etcd with authentication enabled; set together with "
            "etcd_password"
        ),
    )
    etcd_password: str = field(
        default="",
        repr=False,
        metadata=_rules("password of etcd_user; set together with etcd_user"),
    )
    cluster_secret: str = field(
        default="",
        repr=False,
        metadata=_rules(
            "required: shared secret that internal RPCs (node <-> dispatcher, gate -> node) must "
            "carry; also signs session tokens"
        ),
    )
    jwt_secret: str = field(
        default="",
        repr=False,
        metadata=_rules(
            "HMAC secret of the user JWTs signed by the site's backend (HS*); the Gate needs it, "
            "or jwt_public_keys"
        ),
    )
    api_keys: list[str] = field(
        default_factory=list,
        repr=False,
        metadata=_rules("API keys accepted from system senders and operators, comma-separated"),
    )
    host: str = field(
        default="127.0.0.1", metadata=_rules("host or address to listen on", nonempty=True)
    )
    advertise_host: str = field(
        default="",
        metadata=_rules(
            "host other processes and clients use to reach this one; empty means the listen "
            "host (this machine's host name when listening on all interfaces)"
        ),
    )
    port: int = field(default=0, metadata=_GRPC_PORT)
    http_port: int = field(default=0, metadata=_HTTP_PORT)
    metrics_address: str = _metrics_address(0)
    tls_cert: str = field(
        default="", metadata=_rules("PEM certificate chain file for TLS on every listener")
    )
    tls_key: str = field(
        default="", metadata=_rules("PEM private key file for TLS; set together with tls_cert")
    )
    log_level: str = field(
        default="info",
        metadata=_rules(
            "log level: debug, info, warning or error",
            choices=("debug", "info", "warning", "error"),
        ),
    )
    log_format: str = field(
        default="text", metadata=_rules("log format: text or json", choices=("text", "json"))
    )
    grace_period: float = field(
        default=5.0,
        metadata=_rules(
            "upper bound on draining and shutting down, seconds (0 to 3600); streams still "
            "open then are cut",
            minimum=0,
            maximum=3600,
        ),
    )
    cors_origins: list[str] = field(
        default_factory=lambda: ["*"],
        metadata=_rules(
            "origins allowed to call the REST API from a browser (CORS), comma-separated; * allows "
            "any origin (REST takes bearer credentials, never cookies); empty turns CORS off"
        ),
    )
    tls_ca: str = field(
        default="",
        metadata=_rules(
            "PEM file of the CA that signed the cluster's certificates; calls to other Pigeon "
            "processes (gate -> node, node -> dispatcher) use TLS and verify against it when set, "
            "against the system's trusted roots when only tls_cert is"
        ),
    )
    user_rate: float = field(
        default=100.0,
        metadata=_rules(
            "requests per second one user may make to this process (sustained); 0 turns the "
            f"limit off, otherwise at least {_MIN_RATE:g}",
            minimum=0,
            check=_check_rate,
        ),
    )
    user_burst: int = field(
        default=200,
        metadata=_rules(
            f"requests one user may make at once above user_rate (1 to {_MAX_BURST})",
            minimum=1,
            maximum=_MAX_BURST,
        ),
    )
    key_rate: float = field(
        default=2000.0,
        metadata=_rules(
            "requests per second one API key may make to this process (sustained); 0 turns the "
            f"limit off, otherwise at least {_MIN_RATE:g}",
            minimum=0,
            check=_check_rate,
        ),
    )
    key_burst: int = field(
        default=4000,
        metadata=_rules(
            f"requests one API key may make at once above key_rate (1 to {_MAX_BURST})",
            minimum=1,
            maximum=_MAX_BURST,
        ),
    )
    auth_failure_rate: float = field(
        default=5.0,
        metadata=_rules(
            "failed authentications per second accepted from one client address (sustained); "
            "past it, calls that fail authentication get RESOURCE_EXHAUSTED with a retry delay, "
            "while valid credentials from that address are still served; 0 turns the limit "
            f"off, otherwise at least {_MIN_RATE:g}",
            minimum=0,
            check=_check_rate,
        ),
    )
    auth_failure_burst: int = field(
        default=100,
        metadata=_rules(
            "failed authentications one client address may make at once above "
            f"auth_failure_rate (1 to {_MAX_BURST})",
            minimum=1,
            maximum=_MAX_BURST,
        ),
    )
    trusted_proxies: list[str] = field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        metadata=_rules(
            "addresses or networks of proxies whose X-Forwarded-For names the client, "
            "comma-separated; the REST gateway calls its own gRPC server over loopback, or by "
            "the advertised host with TLS (then add that host's address); a client behind "
            "anything else is known by the address it connects from",
            check=_check_network,
        ),
    )
    idle_timeout: float = field(
        default=120.0,
        metadata=_rules(
            "seconds a client connection may stay open with no call in flight before it is "
            "closed (1 to 86400); a stream is a call, so subscribers are never idle",
            minimum=1,
            maximum=86400,
        ),
    )
    max_connections: int = field(
        default=20000,
        metadata=_rules(
            "most client connections each listener (gRPC, HTTP) takes at once (1 to 1000000); "
            "more wait until some close (gRPC) or get 503 (HTTP)",
            minimum=1,
            maximum=1_000_000,
        ),
    )
    api_key_sources: list[str] = field(
        default_factory=list,
        metadata=_rules(
            "sources API keys may publish as, comma-separated entries KEYID=source1|source2 "
            "where KEYID is the key's id (key-xxxxxxxx, logged at start-up); a key without an "
            "entry may publish as any source",
            check=_check_source_scope,
        ),
    )

    def __post_init__(self) -> None:
        """Check every value and the rules that span fields.

        Raises:
            ConfigError: A value breaks its rule; ``key`` is the field name.
        """
        for spec in _specs(type(self)).values():
            problem = spec.problem(getattr(self, spec.name))
            if problem is not None:
                raise ConfigError(f"bad value for {spec.name}: {problem}", key=spec.name)
        # A certificate without its key (or the reverse) is a half-done TLS set-up; refusing it
        # beats a server that quietly listens in plaintext.
        if bool(self.tls_cert) != bool(self.tls_key):
            present, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ConfigError(
                f"{present} is set but {missing} is not: TLS needs both a certificate and its key "
                f"(set {env_var(missing)} or {_flag(missing)}, or unset {present})",
                key=missing,
            )
        _check_etcd_credentials(self)
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                reason = "no such file" if not os.path.exists(path) else "not readable"
                raise ConfigError(f"bad value for {name}: {path!r}: {reason}", key=name)

    @property
    def advertised_host(self) -> str:
        """The host to publish in etcd and hand to clients.

        ``advertise_host`` if set; otherwise ``host``, except that a wildcard listen address
        (``0.0.0.0``, ``::``) is not reachable, so this machine's host name is used instead.
        """
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", "[::]"):
            return socket.gethostname()
        return self.host


@dataclass(frozen=True, kw_only=True)
class GateConfig(CommonConfig):
    """Settings of the Gate (``python -m gate``)."""

    section: ClassVar[str] = "gate"

    port: int = field(default=7070, metadata=_GRPC_PORT)
    http_port: int = field(default=8070, metadata=_HTTP_PORT)
    metrics_address: str = _metrics_address(9070)
    jwt_public_keys: list[str] = field(
        default_factory=list,
        metadata=_rules(
            "paths of PEM public keys (or certificates) of user JWTs signed with RS*/ES*/PS*, "
            "comma-separated"
        ),
    )
    jwt_algorithms: list[str] = field(
        default_factory=lambda: ["HS256"],
        metadata=_rules(
            "JWT algorithms accepted for user tokens, from " + ", ".join(JWT_ALGORITHMS),
            choices=JWT_ALGORITHMS,
            nonempty=True,
            check=_check_algorithm,
        ),
    )
    jwt_audience: str = field(
        default="",
        metadata=_rules("required 'aud' of user tokens; empty means tokens must carry no 'aud'"),
    )
    jwt_issuer: str = field(
        default="", metadata=_rules("required 'iss' of user tokens; empty means not checked")
    )
    jwt_leeway: float = field(
        default=10.0,
        metadata=_rules(
            "clock skew tolerated on exp/nbf/iat of tokens, seconds (0 to 300)",
            minimum=0,
            # More than minutes of skew is a broken clock, and it would keep expired tokens valid.
            maximum=300,
        ),
    )
    session_ttl: int = field(
        default=900,
        metadata=_rules(
            "lifetime of the session tokens the Gate issues, seconds (1 to 2592000, 30 days)",
            minimum=1,
            # Unbounded, a huge TTL made every Connect INTERNAL (the expiry is a protobuf
            # Timestamp, which ends in 9999); a month is already far longer than a session needs.
            maximum=30 * 24 * 3600,
        ),
    )
    heartbeat_interval: float = field(
        default=15.0,
        metadata=_heartbeat_rules(
            "heartbeat interval the Gate tells clients to expect until their node's welcome "
            "says its own (each node sets its own heartbeat_interval)"
        ),
    )
    placement_epsilon: float = field(
        default=0.25,
        metadata=_rules(
            "load bound of placement: a node with more than (1 + this) x the average "
            "connections is skipped",
            minimum=0,
        ),
    )
    fallback_nodes: int = field(
        default=2, metadata=_rules("fallback nodes returned with each placement", minimum=0)
    )
    jwt_max_lifetime: int = field(
        default=86400,
        metadata=_rules(
            "longest lifetime of a user token accepted (exp - iat, or exp - now without iat), "
            "seconds; 0 accepts any",
            minimum=0,
        ),
    )


@dataclass(frozen=True, kw_only=True)
class NodeConfig(CommonConfig):
    """Settings of a Notifications node (``python -m node``)."""

    section: ClassVar[str] = "node"

    node_id: str = field(
        default="",
        metadata=_rules(
            "unique id of this node in the cluster; empty generates one. A node started with the "
            "id of a live one is refused (exit 2)"
        ),
    )
    port: int = field(default=7071, metadata=_GRPC_PORT)
    http_port: int = field(default=8071, metadata=_HTTP_PORT)
    metrics_address: str = _metrics_address(9071)
    store: str = field(
        default="sqlite",
        metadata=_rules(
            "message store: sqlite (embedded) or mongodb", choices=("sqlite", "mongodb")
        ),
    )
    sqlite_path: str = field(
        default="pigeon.db",
        metadata=_rules("SQLite database file (store=sqlite)", nonempty=True),
    )
    sqlite_synchronous: str = field(
        default="full",
        metadata=_rules(
            "SQLite durability: full syncs every commit (an acknowledged message survives a "
            "power loss); normal syncs at checkpoints (survives process crashes only)",
            choices=("full", "normal"),
        ),
    )
    mongodb_uri: str = field(
        default="mongodb://127.0.0.1:27017",
        # Connection strings routinely embed a password.
        repr=False,
        metadata=_rules("MongoDB connection string (store=mongodb)", check=_check_mongodb_uri),
    )
    mongodb_database: str = field(
        default="pigeon", metadata=_rules("MongoDB database name", nonempty=True)
    )
    max_body_bytes: int = field(
        default=65536, metadata=_rules("largest message body accepted, bytes", minimum=1)
    )
    max_title_bytes: int = field(
        default=1024, metadata=_rules("largest message title accepted, bytes", minimum=1)
    )
    max_metadata_bytes: int = field(
        default=8192,
        metadata=_rules("largest message metadata accepted (all entries), bytes", minimum=1),
    )
    max_recipients: int = field(
        default=1000,
        metadata=_rules(
            "most recipients of one message; also of one user's Send, its batch together",
            minimum=1,
        ),
    )
    max_page_size: int = field(
        default=200, metadata=_rules("most messages returned by one inbox page", minimum=1)
    )
    batch_max_size: int = field(
        default=256,
        metadata=_rules(
            "most messages written to the store in one group commit; also the most one Send or "
            "Publish may carry",
            minimum=1,
        ),
    )
    # 0: batches still form from what arrives while a write is in flight, and a wait would only
    # add latency (2 ms cost 2 ms at p50 and gave no throughput, measured with bench/).
    batch_max_wait_ms: float = field(
        default=0.0,
        metadata=_rules(
            "extra time a write waits for more messages after an idle spell, milliseconds "
            "(batches form anyway while a write is in flight)",
            minimum=0,
            maximum=1000,
        ),
    )
    stream_queue_size: int = field(
        default=1024,
        metadata=_rules(
            "outgoing queue of each client stream, messages; a stream whose queue fills is "
            "ended with a reconnect hint",
            minimum=1,
        ),
    )
    max_streams_per_user: int = field(
        default=32,
        metadata=_rules(
            "open streams one user may hold on one node (devices and tabs); more get "
            "RESOURCE_EXHAUSTED",
            minimum=1,
        ),
    )
    heartbeat_interval: float = field(
        default=15.0,
        metadata=_heartbeat_rules("interval of keep-alive events on client streams"),
    )
    load_report_interval: float = field(
        default=2.0,
        metadata=_rules(
            "interval of load updates written to etcd, seconds (0.1 to 300)",
            positive=True,
            # Each update is an etcd write; rarer than every few minutes leaves placement blind.
            minimum=0.1,
            maximum=300,
        ),
    )
    routing_report_interval_ms: float = field(
        default=20.0,
        metadata=_rules(
            "interval of user-routing updates sent to the dispatchers, milliseconds (1 to 1000)",
            positive=True,
            # Below a millisecond it is a busy loop; above a second a user who just connected
            # is known to the dispatchers (and sent routed messages) only that much later.
            minimum=1,
            maximum=1000,
        ),
    )


@dataclass(frozen=True, kw_only=True)
class DispatcherConfig(CommonConfig):
    """Settings of a Dispatcher (``python -m dispatcher``)."""

    section: ClassVar[str] = "dispatcher"

    dispatcher_id: str = field(
        default="",
        metadata=_rules("unique id of this dispatcher in the cluster; empty generates one"),
    )
    port: int = field(default=7072, metadata=_GRPC_PORT)
    http_port: int = field(default=8072, metadata=_HTTP_PORT)
    metrics_address: str = _metrics_address(9072)
    routing_mode: str = field(
        default="routed",
        metadata=_rules(
            "routed: relay an envelope only to the nodes holding a recipient; broadcast: relay "
            "it to every node",
            choices=("routed", "broadcast"),
        ),
    )
    node_queue_size: int = field(
        default=10000,
        metadata=_rules(
            "outgoing queue per subscribed node, envelopes; a node whose queue fills is "
            "disconnected",
            minimum=1,
        ),
    )


# Every service config, by TOML table. The file is shared, so each service checks all of them.
_SERVICES: dict[str, type[CommonConfig]] = {
    cls.section: cls for cls in (GateConfig, NodeConfig, DispatcherConfig)
}


# --- field specs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """One setting: its name, kind and rules, read from the dataclass field."""

    name: str
    kind: str  # "str", "int", "float", "bool" or "list"
    default: Any
    help: str
    choices: tuple[str, ...]
    minimum: float | None
    maximum: float | None
    positive: bool
    nonempty: bool
    check: _Check | None

    def parse_text(self, raw: str) -> Any:
        """Convert a flag or environment value; raise ValueError with what was expected."""
        if self.kind == "str":
            value: Any = raw
        elif self.kind == "int":
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"expected an integer, got {raw!r}") from None
        elif self.kind == "float":
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"expected a number, got {raw!r}") from None
        elif self.kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("true", "1", "yes"):
                value = True
            elif lowered in ("false", "0", "no"):
                value = False
            else:
                raise ValueError(f"expected true/false/1/0/yes/no, got {raw!r}")
        else:
            value = [item.strip() for item in raw.split(",") if item.strip()]
        return self._finish(value)

    def parse_toml(self, raw: Any) -> Any:
        """Convert a value read from TOML; raise ValueError with what was expected."""
        # bool is an int subclass in Python: a TOML `true` must not pass as a port number.
        if self.kind == "str":
            ok = isinstance(raw, str)
            expected = "a string"
        elif self.kind == "int":
            ok = isinstance(raw, int) and not isinstance(raw, bool)
            expected = "an integer"
        elif self.kind == "float":
            ok = isinstance(raw, int | float) and not isinstance(raw, bool)
            expected = "a number"
        elif self.kind == "bool":
            ok = isinstance(raw, bool)
            expected = "true or false"
        else:
            ok = isinstance(raw, list) and all(isinstance(item, str) for item in raw)
            expected = "an array of strings"
        if not ok:
            raise ValueError(f"expected {expected}, got {_toml_repr(raw)}")
        if self.kind == "float":
            raw = float(raw)
        elif self.kind == "list":
            raw = list(raw)
        return self._finish(raw)

    def _finish(self, value: Any) -> Any:
        # Choices are matched case-insensitively and stored in their canonical spelling, so
        # PIGEON_LOG_LEVEL=INFO and jwt_algorithms=["hs256"] work.
        if self.choices:
            if self.kind == "list":
                value = [self._canonical(item) for item in value]
            else:
                value = self._canonical(value)
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def _canonical(self, value: str) -> str:
        for choice in self.choices:
            if choice.lower() == value.lower():
                return choice
        return value

    def problem(self, value: Any) -> str | None:
        """Say what is wrong with an already typed value, or None if it is fine."""
        if not _has_kind(value, self.kind):
            return f"expected {self.kind}, got {type(value).__name__}"
        items = value if self.kind == "list" else [value]
        if self.nonempty and not value:
            return "must not be empty"
        if self.kind == "float" and not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        if self.positive and value <= 0:
            return f"must be greater than 0, got {_number(value)}"
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {_number(self.minimum)}, got {_number(value)}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {_number(self.maximum)}, got {_number(value)}"
        for item in items:
            if self.check is not None:
                problem = self.check(item)
                if problem is not None:
                    return problem
            if self.choices and item not in self.choices:
                return f"expected one of {', '.join(self.choices)}, got {item!r}"
        return None


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "list":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "bool": bool}[kind])


def _kind_of(hint: Any, owner: type, name: str) -> str:
    if hint == list[str]:
        return "list"
    for kind, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if hint is typ:
            return kind
    raise TypeError(f"{owner.__name__}.{name}: settings must be str, int, float, bool or list[str]")


_SPECS: dict[type[CommonConfig], dict[str, _Spec]] = {}


def _specs(cls: type[CommonConfig]) -> dict[str, _Spec]:
    cached = _SPECS.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    specs: dict[str, _Spec] = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        meta = f.metadata
        specs[f.name] = _Spec(
            name=f.name,
            kind=_kind_of(hints[f.name], cls, f.name),
            default=default,
            help=meta.get("help", ""),
            choices=meta.get("choices", ()),
            minimum=meta.get("minimum"),
            maximum=meta.get("maximum"),
            positive=meta.get("positive", False),
            nonempty=meta.get("nonempty", False),
            check=meta.get("check"),
        )
    _SPECS[cls] = specs
    return specs


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def env_var(name: str) -> str:
    """The environment variable of a setting.

    Args:
        name: The field name, e.g. ``"node_id"``.

    Returns:
        ``PIGEON_`` + the name in upper case, e.g. ``"PIGEON_NODE_ID"``.
    """
    return ENV_PREFIX + name.upper()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _known_env_vars() -> frozenset[str]:
    names = {env_var(name) for cls in _SERVICES.values() for name in _specs(cls)}
    return frozenset(names | _OTHER_ENV_VARS)


def known_env_vars() -> set[str]:
    """Every ``PIGEON_*`` environment variable that some Pigeon service reads.

    Returns:
        A new set with the settings of all services plus ``PIGEON_CONFIG``.
    """
    return set(_known_env_vars())


def _suggest(name: str, candidates: Sequence[str] | set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- command line ------------------------------------------------------------------------------


def _default_text(spec: _Spec) -> str:
    if spec.kind == "list":
        return ",".join(spec.default) if spec.default else "none"
    if spec.kind == "str":
        return spec.default if spec.default else '""'
    if spec.kind == "bool":
        return "true" if spec.default else "false"
    if spec.kind == "float":
        return f"{spec.default:g}"
    return str(spec.default)


_METAVARS = {"str": "TEXT", "int": "N", "float": "NUMBER", "bool": "BOOL", "list": "A,B,..."}


def _metavar(spec: _Spec) -> str:
    if spec.choices and spec.kind == "str":
        return "|".join(spec.choices)
    return _METAVARS[spec.kind]


def build_parser(cls: type[CommonConfig], *, prog: str | None = None) -> argparse.ArgumentParser:
    """Build the command-line parser of a service: ``--config`` and one flag per setting.

    Each flag's help gives its environment variable and default. Flags are parsed as text and
    converted by :func:`load_config`, so that a bad flag value gets the same error as a bad
    environment or file value. The parser does not exit on bad input (``exit_on_error=False``);
    ``--help`` still prints and exits.

    Args:
        cls: The service's config class.
        prog: Program name shown in the usage line; defaults to ``python -m <service>``.

    Returns:
        The parser; a flag's ``dest`` is its field name, and flags not given are absent from the
        namespace (``argparse.SUPPRESS``).
    """
    if prog is None and cls.section:
        prog = f"python -m {cls.section}"
    table = f"the [{cls.section}] table" if cls.section else "the top level"
    parser = argparse.ArgumentParser(
        prog=prog,
        # The generated usage line would list all ~30 flags; the groups below do that better.
        usage="%(prog)s [--config PATH] [--SETTING VALUE ...]",
        description=(
            f"Settings come from flags, then {ENV_PREFIX}* environment variables, then a TOML "
            "file, then the defaults. In the file, common settings sit at the top level and this "
            f"service's own settings in {table}."
        ),
        epilog=(
            "Lists are comma-separated in flags and variables, arrays in TOML. Unknown flags, "
            "variables and keys are errors."
        ),
        allow_abbrev=False,
        exit_on_error=False,
    )
    parser.add_argument(
        _CONFIG_FLAG,
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"TOML file to read settings from (env {_CONFIG_ENV})",
    )
    specs = _specs(cls)
    common = set(_specs(CommonConfig))
    groups = [("common settings", [s for n, s in specs.items() if n in common])]
    if cls.section:
        own = [s for n, s in specs.items() if n not in common]
        groups.insert(0, (f"{cls.section} settings", own))
    for title, group_specs in groups:
        group = parser.add_argument_group(title)
        for spec in group_specs:
            # argparse %-formats help strings.
            text = f"{spec.help} (env {env_var(spec.name)}; default {_default_text(spec)})"
            group.add_argument(
                _flag(spec.name),
                dest=spec.name,
                metavar=_metavar(spec),
                default=argparse.SUPPRESS,
                help=text.replace("%", "%%"),
            )
    return parser


def _values_from_flags(
    cls: type[CommonConfig], argv: Sequence[str], prog: str | None
) -> tuple[dict[str, Any], str | None]:
    parser = build_parser(cls, prog=prog)
    try:
        namespace, extra = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        flag = exc.argument_name or "command line"
        raise ConfigError(f"bad flag {flag}: {exc.message}", key=flag, source="flag") from exc
    if extra:
        word = extra[0]
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            flags = [_flag(name) for name in _specs(cls)] + [_CONFIG_FLAG]
            raise ConfigError(
                f"unknown flag {flag}{_suggest(flag, flags)}", key=flag, source="flag"
            )
        raise ConfigError(
            f"unexpected argument {word!r}: settings are given as --name VALUE",
            key=word,
            source="flag",
        )
    given = vars(namespace)
    config_path = given.pop("config", None)
    specs = _specs(cls)
    values: dict[str, Any] = {}
    for name, raw in given.items():
        try:
            values[name] = specs[name].parse_text(raw)
        except ValueError as exc:
            flag = _flag(name)
            raise ConfigError(f"bad value for {flag}: {exc}", key=flag, source="flag") from None
    return values, config_path


# --- environment -------------------------------------------------------------------------------


def _values_from_env(cls: type[CommonConfig], env: Mapping[str, str]) -> dict[str, Any]:
    known = _known_env_vars()
    # Sorted so that the error for several unknown variables is the same on every run.
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            raise ConfigError(
                f"unknown setting {name}{_suggest(name, set(known))}", key=name, source="env"
            )
    values: dict[str, Any] = {}
    for name, spec in _specs(cls).items():
        variable = env_var(name)
        if variable in env:
            try:
                values[name] = spec.parse_text(env[variable])
            except ValueError as exc:
                raise ConfigError(
                    f"bad value for {variable}: {exc}", key=variable, source="env"
                ) from None
    return values


# --- TOML file ---------------------------------------------------------------------------------


def _read_toml(path: str, source: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path} (from {source}): {exc.strerror or exc}",
            key=source,
            source="file",
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid TOML: {exc}", key=source, source="file"
        ) from exc


def _parse_table(
    table: Mapping[str, Any], specs: Mapping[str, _Spec], path: str, prefix: str
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in table.items():
        dotted = prefix + key
        spec = specs.get(key)
        if spec is None:
            raise ConfigError(
                f"unknown setting {dotted} in {path}{_suggest(key, list(specs))}",
                key=dotted,
                source="file",
            )
        try:
            values[key] = spec.parse_toml(raw)
        except ValueError as exc:
            raise ConfigError(
                f"bad value for {dotted} in {path}: {exc}", key=dotted, source="file"
            ) from None
    return values


def _values_from_toml(cls: type[CommonConfig], doc: Mapping[str, Any], path: str) -> dict[str, Any]:
    common = _specs(CommonConfig)
    top: dict[str, Any] = {}
    for key, raw in doc.items():
        if key in _SERVICES:
            if not isinstance(raw, dict):
                raise ConfigError(
                    f"{key} in {path} must be a table ([{key}]), got {_toml_repr(raw)}",
                    key=key,
                    source="file",
                )
            continue
        if key in common:
            top[key] = raw
            continue
        if isinstance(raw, dict):
            close = difflib.get_close_matches(key, list(_SERVICES), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise ConfigError(
                f"unknown table [{key}] in {path}{hint}; known tables: "
                + ", ".join(f"[{name}]" for name in _SERVICES),
                key=key,
                source="file",
            )
        owners = [name for name, svc in _SERVICES.items() if key in _specs(svc)]
        if owners:
            raise ConfigError(
                f"{key} in {path} is a [{owners[0]}] setting: move it into the [{owners[0]}] table",
                key=key,
                source="file",
            )
        candidates = list(common) + list(_SERVICES)
        raise ConfigError(
            f"unknown setting {key} in {path}{_suggest(key, candidates)}", key=key, source="file"
        )

    values = _parse_table(top, common, path, "")
    # Check every service's table, not just ours: the file is shared by the whole cluster and a
    # typo should surface at the first start of any service.
    for section, svc in _SERVICES.items():
        table = doc.get(section)
        if table is None:
            continue
        parsed = _parse_table(table, _specs(svc), path, f"{section}.")
        if section == cls.section:
            values.update(parsed)
    return values


# --- loading -----------------------------------------------------------------------------------


def load_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    prog: str | None = None,
) -> T:
    """Build a service's config from flags, environment, TOML file and defaults.

    Args:
        cls: The service's config class, e.g. :class:`NodeConfig`.
        argv: Command-line arguments without the program name; ``None`` reads ``sys.argv[1:]``.
        env: Environment; ``None`` reads ``os.environ``.
        prog: Program name for ``--help``; defaults to ``python -m <service>``.

    Returns:
        The validated config.

    Raises:
        ConfigError: An unknown flag, variable, table or key, an unreadable or invalid file, or a
            bad value. ``key`` names the culprit as the user spelled it (``--port``,
            ``PIGEON_JWT_SECRT``, ``node.max_body_bytes``).
        SystemExit: ``--help`` was given (after printing the help).
    """
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env

    from_flags, config_path = _values_from_flags(cls, argv, prog)
    from_env = _values_from_env(cls, env)

    from_file: dict[str, Any] = {}
    source = _CONFIG_FLAG if config_path else _CONFIG_ENV
    path = config_path or env.get(_CONFIG_ENV, "")
    if path:
        from_file = _values_from_toml(cls, _read_toml(path, source), path)

    return cls(**{**from_file, **from_env, **from_flags})


def reference_markdown() -> str:
    """The configuration reference as Markdown tables (one per service), for the README."""
    parts = []
    common = _specs(CommonConfig)
    groups: list[tuple[str, type[CommonConfig], list[str]]] = [
        ("Every service (top level of the TOML file)", CommonConfig, list(common))
    ]
    for section, svc in _SERVICES.items():
        # Its own settings, and common ones whose default differs here (the ports).
        own = [
            name
            for name, spec in _specs(svc).items()
            if name not in common or spec.default != common[name].default
        ]
        groups.append((f"`python -m {section}` (the `[{section}]` table)", svc, own))
    for title, svc, names in groups:
        specs = _specs(svc)
        rows = [
            f"**{title}**",
            "",
            "| setting | env var | default | meaning |",
            "|---|---|---|---|",
        ]
        for name in names:
            spec = specs[name]
            help_text = spec.help.replace("|", "\\|")
            default = f"`{_default_text(spec)}`"
            if svc is CommonConfig and any(
                _specs(other)[name].default != spec.default for other in _SERVICES.values()
            ):
                default = "per service (below)"  # the ports: each service has its own
            rows.append(f"| `{name}` | `{env_var(name)}` | {default} | {help_text} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"
