"""The ``imagecache`` command: one subcommand per part of the system."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from cachenode.server import NodeConfig, serve
from cachenode.store import DEFAULT_MAX_ITEM_SIZE, MIB, Policy


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

    up = commands.add_parser("up", help="run the whole system on the embedded default")
    up.add_argument("--host", default="127.0.0.1", help="address to listen on")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "node":
        config = NodeConfig(
            host=args.host,
            port=args.port,
            capacity_mb=args.capacity_mb,
            policy=args.policy,
            max_item_mb=args.max_item_mb,
        )
        run(serve(config))
    elif args.command == "up":
        print("imagecache: starting one cache node on the embedded default; Ctrl-C stops it.")
        print(f"Talk to it with any memcached client at {args.host}:11311.", flush=True)
        run(serve(NodeConfig(host=args.host)))
    return 0


def run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it is on Linux), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
