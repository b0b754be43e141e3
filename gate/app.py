"""The Gate process: wiring of config, etcd view, servers and servicer."""

from __future__ import annotations

import asyncio
import logging
import sys

from gate.servicer import GateServicer, track_view_size
from pigeon.auth import ApiKeys, ClusterSecret, SessionTokens, UserTokenVerifier
from pigeon.config import GateConfig
from pigeon.membership import ClusterView, etcd_credentials
from pigeon.ratelimit import RateLimiter
from pigeon.rest import RestGateway, default_web_root
from pigeon.runtime import cancel_and_wait
from pigeon.server import PUBLIC, Principal, Service
from pigeon.service import (
    ChannelCache,
    Listeners,
    channel_factory,
    listen,
    run_service,
    wait_for_stop,
)
from pigeon.v1 import gate_pb2, gate_pb2_grpc

__all__ = ["main", "serve"]

log = logging.getLogger("pigeon.gate")

GATE = gate_pb2.DESCRIPTOR.services_by_name["Gate"].full_name


async def serve(config: GateConfig) -> int:
    """Run the Gate until SIGINT or SIGTERM."""
    api_keys = ApiKeys(config.api_keys, config.api_key_sources)

    def system(token: str | None) -> Principal:
        key_id = api_keys.check(token)
        return Principal("system", key_id, sources=api_keys.scope(key_id))

    # Settings first: a missing secret is said before etcd is asked anything.
    user_tokens = UserTokenVerifier.from_config(config)
    sessions = SessionTokens(config.cluster_secret, ttl=config.session_ttl)
    # The ids are what api_key_sources names; said once the settings are known to be usable.
    log.info("API keys: %s", api_keys.describe())
    channels = ChannelCache(channel_factory(config))
    async with ClusterView(
        config.etcd_endpoints,
        config.etcd_prefix,
        timeout=config.etcd_timeout,
        credentials=etcd_credentials(config),
    ) as view:
        track_view_size(lambda: view.nodes.values())
        servicer = GateServicer(
            nodes=lambda: list(view.nodes.values()),
            dispatchers=lambda: list(view.dispatchers.values()),
            user_tokens=user_tokens,
            sessions=sessions,
            node_channel=channels.get,
            heartbeat_interval=config.heartbeat_interval,
            epsilon=config.placement_epsilon,
            fallbacks=config.fallback_nodes,
            session_ttl=config.session_ttl,
            user_limit=RateLimiter(config.user_rate, config.user_burst, "user"),
            etcd_up=lambda: view.watch.connected,
            cluster_secret=ClusterSecret(config.cluster_secret),
        )
        services = [Service(GATE, lambda s: gate_pb2_grpc.add_GateServicer_to_server(servicer, s))]
        auth = {f"/{GATE}/Connect": PUBLIC, f"/{GATE}/": system}
        rest = RestGateway(
            [gate_pb2.DESCRIPTOR.services_by_name["Gate"]],
            web_root=default_web_root(),
            cors_origins=config.cors_origins,
            auth=auth,
        )
        try:
            async with (
                listen(config, services, auth, rest.routes) as listeners,
                rest.forward_to(listeners.self_address, channel_factory(config)),
            ):
                serving = asyncio.create_task(serve_once_loaded(view, listeners))
                try:
                    await wait_for_stop()
                finally:
                    await cancel_and_wait(serving)
        finally:
            await channels.close()
    return 0


async def serve_once_loaded(view: ClusterView, listeners: Listeners) -> None:
    """Report SERVING once the cluster was read from etcd: a Gate started while etcd is out of
    reach comes up (and waits for it) but is not sent clients it can only turn away."""
    if not view.watch.loaded.is_set():
        log.warning("waiting for etcd before serving: no node is known yet")
    await view.watch.loaded.wait()
    await listeners.grpc.set_serving(True)
    log.info(
        "gate serving gRPC on %s, HTTP on %s, metrics on %s",
        listeners.address,
        listeners.http_address,
        listeners.metrics_address or "(off)",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m gate`."""
    return run_service(GateConfig, serve, argv, prog="python -m gate")


if __name__ == "__main__":
    sys.exit(main())
