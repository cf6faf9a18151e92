"""The ``imagecache`` command: one subcommand per part of the system."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

from cachenode.lifeline import stop_when_stdin_ends
from cachenode.server import NodeConfig, serve
from cachenode.store import DEFAULT_MAX_ITEM_SIZE, MIB, Policy
from imagecache.config import ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagecache", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="run one cache node")
    node.add_argument("--host", default="127.0.0.1", help="address to listen on")
    node.add_argument("--port", type=int, default=11311, help="TCP port; 0 picks a free one")
    node.add_argument("--capacity-mb", type=_positive, default=64.0, help="capacity in MiB")
    node.add_argument(
        "--policy", type=Policy, choices=list(Policy), default=Policy.LRU, help="eviction policy"
    )
    node.add_argument(
        "--max-item-mb",
        type=_positive,
        default=DEFAULT_MAX_ITEM_SIZE / MIB,
        help="largest value accepted, in MiB",
    )
    node.add_argument(
        "--token",
        default=os.environ.get("IMAGECACHE_NODE_TOKEN", ""),
        help="clients must send this token first (AUTH); default: IMAGECACHE_NODE_TOKEN, which"
        " unlike the flag no other user of the machine can read",
    )
    node.add_argument(
        "--tls-cert",
        default=os.environ.get("IMAGECACHE_NODE_TLS_CERT", ""),
        metavar="PEM",
        help="serve TLS with this certificate chain (default: IMAGECACHE_NODE_TLS_CERT)",
    )
    node.add_argument(
        "--tls-key",
        default=os.environ.get("IMAGECACHE_NODE_TLS_KEY", ""),
        metavar="PEM",
        help="the certificate's private key, if not in --tls-cert"
        " (default: IMAGECACHE_NODE_TLS_KEY)",
    )
    node.add_argument(
        "--text-protocol",
        action="store_true",
        help="keep memcached's text protocol on with a token (it has no authentication)",
    )
    node.add_argument(
        "--stop-with-stdin",
        action="store_true",
        help="stop when standard input ends: its parent keeps a pipe open on it, so the"
        " node dies with the parent (the local pool starts nodes so)",
    )
    for name, help_text, default_workers in (
        (
            "up",
            "run the whole system on the embedded default (data in ./imagecache-data)",
            "one per core, at most 4",
        ),
        ("gateway", "run the web gateway and JSON API (port 5000)", "1"),
        ("manager", "run the manager: pool, dashboard, statistics, autoscaler (port 5001)", ""),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", help="TOML configuration file (or IMAGECACHE_CONFIG)")
        if default_workers:
            command.add_argument(
                "--workers",
                type=_positive_int,
                metavar="N",
                help="gateway processes sharing the port (default: gateway.workers of the"
                f" configuration, else {default_workers})",
            )
    # Started by `gateway --workers N` and `up`, which send its configuration (workers.py).
    commands.add_parser("gateway-worker")

    args = parser.parse_args(argv)
    worker = " [worker %(process)d]" if args.command == "gateway-worker" else ""
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{worker}: %(message)s",
    )
    if args.command == "node":
        node_config = NodeConfig(
            host=args.host,
            port=args.port,
            capacity_mb=args.capacity_mb,
            policy=args.policy,
            max_item_mb=args.max_item_mb,
            token=args.token,
            text_protocol=True if args.text_protocol else None,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
        run(_node(node_config, stop_with_stdin=args.stop_with_stdin))
        return 0
    # Imported here so that `imagecache node` starts without loading the web stack.
    from imagecache.up import gateway, gateway_worker, manager, up
    from imagecache.workers import ParentLink, WorkerError

    try:
        if args.command == "gateway-worker":
            parent = ParentLink.from_stdin()
            run(gateway_worker(parent.receive_config(), parent))
            return 0
        config = load_config(args.config)
        if getattr(args, "workers", None) is not None:
            config = replace(config, gateway=replace(config.gateway, workers=args.workers))
        part = {"up": up, "gateway": gateway, "manager": manager}[args.command]
        run(part(config))
    except ConfigError as error:
        print(f"imagecache: {error}", file=sys.stderr)
        return 2
    except WorkerError as error:
        print(f"imagecache: {error}", file=sys.stderr)
        return 1
    return 0


async def _node(config: NodeConfig, *, stop_with_stdin: bool) -> None:
    if not stop_with_stdin:
        await serve(config)
        return
    lifeline = asyncio.create_task(stop_when_stdin_ends())
    try:
        await serve(config)
    finally:
        lifeline.cancel()


def run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it is on Linux), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1, not {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
