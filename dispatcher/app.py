"""The dispatcher process: wiring of config, servers and membership."""

from __future__ import annotations

import logging
import secrets
import sys

from dispatcher.routing import Router
from dispatcher.servicer import DispatcherServicer
from pigeon.auth import ClusterSecret
from pigeon.config import DispatcherConfig
from pigeon.membership import (
    ClusterView,
    dispatcher_key,
    etcd_credentials,
    now_timestamp,
    registered,
)
from pigeon.server import Principal, Service
from pigeon.service import listen, run_service, wait_for_stop
from pigeon.v1 import dispatcher_pb2, dispatcher_pb2_grpc, types_pb2
from pigeon.version import __version__

__all__ = ["main", "serve"]

log = logging.getLogger("pigeon.dispatcher")

DISPATCHER = dispatcher_pb2.DESCRIPTOR.services_by_name["Dispatcher"].full_name


async def serve(config: DispatcherConfig) -> int:
    """Run a dispatcher until SIGINT or SIGTERM."""
    dispatcher_id = config.dispatcher_id or f"dispatcher-{secrets.token_hex(4)}"
    cluster = ClusterSecret(config.cluster_secret)

    def peer(token: str | None) -> Principal:
        cluster.check(token)
        return Principal("cluster", "")

    router = Router(config.routing_mode, config.node_queue_size)
    servicer = DispatcherServicer(router)
    services = [
        Service(
            DISPATCHER, lambda s: dispatcher_pb2_grpc.add_DispatcherServicer_to_server(servicer, s)
        )
    ]
    async with (
        # Nodes that leave the cluster stop holding up the others' reports at once, even if
        # their streams look open (a frozen or cut-off node's does, until keepalive gives up).
        ClusterView(
            config.etcd_endpoints,
            config.etcd_prefix,
            timeout=config.etcd_timeout,
            credentials=etcd_credentials(config),
            on_node_left=router.node_left,
            on_node_joined=router.node_joined,
        ),
        listen(config, services, {f"/{DISPATCHER}/": peer}) as listeners,
    ):
        info = types_pb2.DispatcherInfo(
            dispatcher_id=dispatcher_id,
            address=listeners.address,
            version=__version__,
            started_at=now_timestamp(),
            routing_mode=config.routing_mode,
        )

        def refresh() -> bool:
            changed = info.subscribed_nodes != len(router.links)
            info.subscribed_nodes = len(router.links)
            return changed

        async with registered(
            config, dispatcher_key(config.etcd_prefix, dispatcher_id), info, refresh, 2.0
        ):
            await listeners.grpc.set_serving(True)
            log.info(
                "dispatcher %s serving gRPC on %s, HTTP on %s, metrics on %s",
                dispatcher_id,
                listeners.address,
                listeners.http_address,
                listeners.metrics_address or "(off)",
            )
            await wait_for_stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dispatcher`."""
    return run_service(DispatcherConfig, serve, argv, prog="python -m dispatcher")


if __name__ == "__main__":
    sys.exit(main())
