"""The node process: wiring of config, store, servers, membership and drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterable, Mapping

from node.core import NodeCore
from node.relay import DispatcherRelay, RelayRefusedError
from node.servicer import NodeServicer
from node.store.base import Store, StoreError
from node.validate import Limits
from pigeon.auth import ApiKeys, ClusterSecret, SessionTokens
from pigeon.config import NodeConfig
from pigeon.errors import ConfigError, PigeonError
from pigeon.membership import (
    ClusterView,
    etcd_credentials,
    node_key,
    now_timestamp,
    registered,
)
from pigeon.registry import RegistryConflictError, RegistryUnavailableError
from pigeon.rest import RestGateway
from pigeon.server import Authenticator, Principal, Service
from pigeon.service import channel_factory, listen, run_service, wait_for_stop
from pigeon.v1 import node_pb2, node_pb2_grpc, types_pb2
from pigeon.version import __version__

__all__ = ["main", "serve"]

log = logging.getLogger("pigeon.node")

NODE = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name


def make_store(config: NodeConfig) -> Store:
    """The store the config names."""
    if config.store == "mongodb":
        from node.store.mongo import MongoStore

        return MongoStore(config.mongodb_uri, config.mongodb_database)
    from node.store.sqlite import SqliteStore

    return SqliteStore(config.sqlite_path, synchronous=config.sqlite_synchronous)


def publishers(api_keys: ApiKeys, cluster: ClusterSecret) -> Authenticator:
    """Who may call Node.Publish: a backend with an API key, or a Gate with the cluster secret
    (it checked its caller's API key, which may be configured on the Gates alone)."""

    def publisher(token: str | None) -> Principal:
        try:
            cluster.check(token)
        except PigeonError:
            key_id = api_keys.check(token)
            return Principal("system", key_id, sources=api_keys.scope(key_id))
        return Principal("cluster", "gate")

    return publisher


def store_place(config: NodeConfig) -> str:
    """The store the config names, for messages (no credentials)."""
    if config.store == "mongodb":
        return f"MongoDB database {config.mongodb_database!r}"
    return f"SQLite file {os.path.abspath(config.sqlite_path)!r}"


class SharedStoreCheck:
    """Every node of a cluster must use one store: nodes with stores of their own would hand out
    the same seqs for different messages, and clients drop a seq they have seen. Each node
    registers its store's id; a node refuses to join nodes that show another, and warns when one
    joins later (two started at the same moment)."""

    def __init__(self, node_id: str, store_id: str, place: str) -> None:
        self._node_id = node_id
        self._store_id = store_id
        self._place = place
        self._reported: set[tuple[str, str]] = set()

    def _others(self, nodes: Iterable[types_pb2.NodeInfo]) -> list[types_pb2.NodeInfo]:
        return sorted(
            (
                n
                for n in nodes
                if n.node_id != self._node_id and n.store_id and n.store_id != self._store_id
            ),
            key=lambda n: n.node_id,
        )

    def _problem(self, others: list[types_pb2.NodeInfo]) -> str:
        listed = ", ".join(f"{n.node_id} (store {n.store_id})" for n in others)
        return (
            f"node(s) {listed} use another message store than this node's {self._place} (store "
            f"{self._store_id}); every node of a cluster must share one store: one SQLite file "
            "that all nodes open on one machine, or one MongoDB database"
        )

    def before_joining(self, nodes: Iterable[types_pb2.NodeInfo]) -> None:
        others = self._others(nodes)
        if others:
            raise ConfigError(self._problem(others), key="store")

    def while_serving(self, nodes: Iterable[types_pb2.NodeInfo]) -> None:
        others = [n for n in self._others(nodes) if (n.node_id, n.store_id) not in self._reported]
        if others:
            self._reported.update((n.node_id, n.store_id) for n in others)
            log.error("%s", self._problem(others))


def limits_of(config: NodeConfig) -> Limits:
    return Limits(
        max_body_bytes=config.max_body_bytes,
        max_title_bytes=config.max_title_bytes,
        max_metadata_bytes=config.max_metadata_bytes,
        max_recipients=config.max_recipients,
        max_page_size=config.max_page_size,
        max_batch=config.batch_max_size,
    )


async def serve(config: NodeConfig) -> int:
    """Run a node until SIGINT or SIGTERM, then drain."""
    node_id = config.node_id or f"node-{secrets.token_hex(4)}"
    api_keys = ApiKeys(config.api_keys, config.api_key_sources)
    publisher = publishers(api_keys, ClusterSecret(config.cluster_secret))
    sessions = SessionTokens(config.cluster_secret)
    # The ids are what api_key_sources names; said once the settings are known to be usable.
    log.info("API keys: %s", api_keys.describe())

    def user(token: str | None) -> Principal:
        claims = sessions.verify(token)
        return Principal("user", claims.user_id, sessions.usable_until(claims))

    store = make_store(config)
    await store.open()
    try:
        async with (
            NodeCore(
                store,
                node_id=node_id,
                limits=limits_of(config),
                stream_queue_size=config.stream_queue_size,
                heartbeat_interval=config.heartbeat_interval,
                batch_max_size=config.batch_max_size,
                batch_max_wait=config.batch_max_wait_ms / 1000,
                max_streams_per_user=config.max_streams_per_user,
            ) as core,
            ClusterView(
                config.etcd_endpoints,
                config.etcd_prefix,
                timeout=config.etcd_timeout,
                credentials=etcd_credentials(config),
                # A node that stopped may have stored messages it never relayed (it died
                # between the two): the streams here check the store for their users.
                on_node_left=lambda left: core.resync() if left != node_id else None,
            ) as view,
        ):
            shared = await _may_join(config, node_id, core.store, view)
            await _relay_and_serve(
                config,
                node_id,
                core,
                view,
                shared,
                {f"/{NODE}/Publish": publisher, f"/{NODE}/": user},
            )
    finally:
        await store.close()
    return 0


async def _may_join(
    config: NodeConfig, node_id: str, store: Store, view: ClusterView
) -> SharedStoreCheck:
    """Checks against the live nodes before this one shows itself to anyone (dispatchers,
    Gates): they must share its store, and none may be a live process with its id."""
    shared = SharedStoreCheck(node_id, store.store_id, store_place(config))
    # Without etcd the registration fails later and says so; the checks need the view.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(config.etcd_timeout * 2):
            await view.watch.loaded.wait()
    shared.before_joining(view.nodes.values())
    key = node_key(config.etcd_prefix, node_id)
    if key in view.watch.view:
        # Subscribed to the dispatchers, two processes with one id would take each other's
        # streams over until the registration refuses one. A crashed predecessor's key goes
        # with its lease: wait that long.
        log.info("%s is registered: waiting up to a lease's life for it to go", key)
        try:
            await view.watch.wait_for(
                lambda keys: key not in keys, config.lease_ttl + 2 * config.etcd_timeout
            )
        except TimeoutError:
            raise RegistryConflictError(
                f"{key} is held by another live process: two processes were given the same id"
            ) from None
    return shared


async def _relay_and_serve(
    config: NodeConfig,
    node_id: str,
    core: NodeCore,
    view: ClusterView,
    shared: SharedStoreCheck,
    auth: Mapping[str, Authenticator],
) -> None:
    async with DispatcherRelay(
        node_id=node_id,
        cluster_secret=config.cluster_secret,
        dispatchers=lambda: view.dispatchers,
        users=core.pool.users,
        deliver=core.receive,
        report_interval=config.routing_report_interval_ms / 1000,
        channel=channel_factory(config),
        resync=core.resync,
    ) as relay:
        core.relay = relay
        # The supervisor opens the streams within a moment; checks of the view are periodic.
        try:
            connected = await relay.wait_connected(within=5.0)
        except RelayRefusedError as exc:
            raise ConfigError(str(exc), key="cluster_secret") from exc
        if not connected:
            log.warning("not every dispatcher answered within 5 s; serving anyway")
        await _serve(config, node_id, core, auth, view, shared)


async def _serve(
    config: NodeConfig,
    node_id: str,
    core: NodeCore,
    auth: Mapping[str, Authenticator],
    view: ClusterView,
    shared: SharedStoreCheck,
) -> None:
    servicer = NodeServicer(core)
    services = [Service(NODE, lambda s: node_pb2_grpc.add_NodeServicer_to_server(servicer, s))]
    rest = RestGateway(
        [node_pb2.DESCRIPTOR.services_by_name["Node"]],
        cors_origins=config.cors_origins,
        auth=auth,
    )
    async with (
        listen(config, services, auth, rest.routes) as listeners,
        rest.forward_to(listeners.self_address, channel_factory(config)),
    ):
        info = types_pb2.NodeInfo(
            node_id=node_id,
            address=listeners.address,
            http_address=listeners.http_address,
            version=__version__,
            started_at=now_timestamp(),
            state=types_pb2.NODE_STATE_SERVING,
            store_id=core.store.store_id,
        )
        info.heartbeat_interval.FromNanoseconds(int(config.heartbeat_interval * 1e9))

        def refresh() -> bool:
            shared.while_serving(view.nodes.values())
            changed = (info.connections, info.users) != (
                core.pool.connections,
                core.pool.user_count,
            )
            info.connections = core.pool.connections
            info.users = core.pool.user_count
            return changed

        async with registered(
            config,
            node_key(config.etcd_prefix, node_id),
            info,
            refresh,
            config.load_report_interval,
        ) as registration:
            await listeners.grpc.set_serving(True)
            log.info(
                "node %s serving gRPC on %s, HTTP on %s, metrics on %s",
                node_id,
                listeners.address,
                listeners.http_address,
                listeners.metrics_address or "(off)",
            )
            await wait_for_stop()
            # Drain: leave the Gates' view first so no new user lands here while streams move.
            started = time.monotonic()
            try:
                await registration.withdraw()
            except RegistryUnavailableError as exc:
                # The key goes when its lease expires; the streams must move all the same.
                log.warning("draining while still listed in etcd: %s", exc)
            await listeners.grpc.set_serving(False)
            streams = core.pool.connections
            await core.drain(config.grace_period)
            log.info(
                "node %s drained %d streams in %.2f s",
                node_id,
                streams,
                time.monotonic() - started,
            )


def main(argv: list[str] | None = None) -> int:
    """`python -m node`."""
    return run_service(NodeConfig, serve, argv, prog="python -m node", fatal=(StoreError,))


if __name__ == "__main__":
    sys.exit(main())
