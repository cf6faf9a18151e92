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
    _add_whatif(commands)

    args = parser.parse_args(argv)
    worker = " [worker %(process)d]" if args.command == "gateway-worker" else ""
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{worker}: %(message)s",
    )
    if args.command == "node":
        node_config = NodeConfig(
            **{name: getattr(args, name) for name in _NODE_OPTIONS},
            text_protocol=True if args.text_protocol else None,
        )
        run(_node(node_config, stop_with_stdin=args.stop_with_stdin))
        return 0
    if args.command == "whatif":
        return _whatif(args)
    # Imported here so that `imagecache node` starts without loading the web stack.
    from imagecache.workers import ParentLink, WorkerError
    from launcher.up import gateway, gateway_worker, manager, up

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


# `imagecache node`'s options that are NodeConfig's fields of the same name.
_NODE_OPTIONS = (
    "host",
    "port",
    "capacity_mb",
    "policy",
    "max_item_mb",
    "token",
    "tls_cert",
    "tls_key",
)


# `imagecache whatif`'s overrides of the stored settings, by their API names (manager.settings).
_WHATIF_OVERRIDES = {
    "max_miss": "maxMiss",
    "min_miss": "minMiss",
    "exp_ratio": "expRatio",
    "shrink_ratio": "shrinkRatio",
    "min_lookups": "minLookups",
}


def _add_whatif(commands: Any) -> None:
    whatif = commands.add_parser(
        "whatif",
        help="replay the recorded minutes under other autoscaler settings or policies",
        description="Replay the last minutes the manager recorded (statistics and miss curves,"
        " in the stores its configuration names) as the autoscaler would have judged them,"
        " and print the sizes and miss rates beside what happened. Changes nothing.",
    )
    whatif.add_argument("--config", help="TOML configuration file (or IMAGECACHE_CONFIG)")
    whatif.add_argument(
        "--minutes",
        type=_positive_int,
        default=60,
        metavar="N",
        help="the last N whole minutes (default 60)",
    )
    whatif.add_argument(
        "--policy",
        choices=("ratio", "predictive"),
        help="resize by the ratios or by the predicted miss rate (default: the stored scaling)",
    )
    for name, api_name in _WHATIF_OVERRIDES.items():
        whatif.add_argument(
            f"--{name.replace('_', '-')}",
            type=_whole if name == "min_lookups" else _fraction_or_ratio,
            metavar="N" if name == "min_lookups" else "X",
            help=f"instead of the stored {api_name}",
        )


def _whatif(args: argparse.Namespace) -> int:
    """Print the what-if report; 2 for a bad configuration or setting, 1 when a store fails."""
    from datetime import UTC, datetime

    from imagecache.errors import StorageError
    from manager.settings import SettingsError
    from manager.whatif_report import MAX_SPAN_MINUTES, format_report, report_from_config

    if args.minutes > MAX_SPAN_MINUTES:
        print(f"imagecache whatif: --minutes must be at most {MAX_SPAN_MINUTES}", file=sys.stderr)
        return 2
    overrides = {
        api_name: getattr(args, name)
        for name, api_name in _WHATIF_OVERRIDES.items()
        if getattr(args, name) is not None
    }
    if args.policy is not None:
        overrides["scaling"] = args.policy
    try:
        config = load_config(args.config)
        report = asyncio.run(
            report_from_config(config, overrides, span_minutes=args.minutes, now=datetime.now(UTC))
        )
    except (ConfigError, SettingsError) as error:
        print(f"imagecache whatif: {error}", file=sys.stderr)
        return 2
    except StorageError as error:
        print(f"imagecache whatif: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
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


def _whole(text: str) -> str:
    """A whole number from 0, kept as text for manager.settings to check."""
    if not text.strip().isascii() or not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number from 0, not {text}")
    return text.strip()


def _fraction_or_ratio(text: str) -> str:
    """A finite number, kept as text for manager.settings to check its range."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a number, not {text}")
    return text


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
