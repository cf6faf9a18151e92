"""Benchmark the gateway's cache-miss path against nginx on the same files (see bench/README.md).

Starts, on free loopback ports and in a temporary folder, one cache node of
``--node-mb`` (1 MB: it holds about ten of the images, so nearly every read
misses), the gateway (``imagecache gateway``, its folder blob store and SQLite
metadata, as ``imagecache up`` keeps them) and nginx (one process,
``sendfile on``) whose ``/image/<key>`` are hard links to the gateway's very
blob files. It uploads ``--images`` random-noise PNGs of about ``--size``
through the gateway's API, then runs ``wrk -t1 -c16 --latency`` with a script
that reads a random key per request against both in turn (A B A B). The node,
the gateway and nginx are pinned to core 0, wrk to core 1.

It prints throughput, p50 and p99 latency and server CPU per request (the
gateway process with its threads, and the node apart) beside the goals of
issue 14 (a miss at most 500 us of gateway CPU, at least 0.3x nginx's
throughput), the share of reads that missed (the gateway's counters) and
checks that every response was a whole image.

``--s3`` adds a third system: the same workload through a second gateway whose
blob store is S3 on a moto server (no goal: moto is not S3; it shows the S3
path is not pathological).

Unless ``--no-floor``, three more systems show the floor under any Python
gateway (bench/floorserver.py: a bare uvloop server with no versions, leases
or error handling) on the same files, core and load: the row and the blob
alone, then with a memcached GET first, then with every miss also stored in
memcached (``set ... noreply``), as a cache that admits every miss must.
memcached gets the node's capacity; its CPU counts in the node column.

``--py-spy PATH`` then profiles the gateway under the same load and prints
where its time goes.

Every process started here is stopped on the way out, also on an error,
Ctrl-C or SIGTERM (and, through PR_SET_PDEATHSIG, if this process is killed).
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Final

from benchkit import (
    HOST,
    KIB,
    Children,
    Cores,
    Server,
    describe_cores,
    free_port,
    noise_png,
    parse_size,
    print_table_header,
    progress,
    ratio_of,
    read_ready_line,
    run_guarded,
    show_log_tails,
    start_memcached,
    verdict,
    wait_until_listening,
)
from gateway import (
    IMAGE_WIDTH,
    WRK_SCRIPT,
    Cell,
    System,
    Wrk,
    _binary,
    check_response,
    gateway_counters,
    gateway_data_dir,
    place_on_cores,
    print_profile,
    profile_gateway,
    run_wrk,
    start_gateway,
    start_nginx_on,
    start_node,
    upload,
)

IMAGE_SEED: Final = 20261205
# Goals from issue 14: gateway CPU per miss, and throughput beside nginx's.
GOAL_CPU_PER_MISS_US: Final = 500.0
GOAL_RATIO: Final = 0.3
UPLOAD_THREADS: Final = 8
# memcached's least item size limit (-I) without -o slab_chunk_max: its default chunk.
MEMCACHED_SLAB_CHUNK: Final = 512 * KIB
FLOOR_SERVER: Final = Path(__file__).with_name("floorserver.py")
FLOOR_READY: Final = rb"floor server listening on port (\d+)"
# The floor's variants: their names, and whether each asks memcached first
# and whether it also stores every miss there.
FLOOR_VARIANTS: Final = {
    "floor: row + blob": (False, False),
    "floor: + memcached GET": (True, False),
    "floor: + GET + fill": (True, True),
}
MOTO_REGION: Final = "us-east-1"
BUCKET: Final = "imagecache-bench"


def key_of(number: int) -> str:
    return f"k{number:05d}"


def random_keys_script(images: int) -> str:
    """wrk's Lua: a random key per request, then the exact figures ``done`` prints."""
    return (
        f"""\
math.randomseed(os.time())
request = function()
  return wrk.format("GET", string.format("/image/k%05d", math.random(0, {images - 1})))
end
"""
        + WRK_SCRIPT
    )


def start_moto(children: Children, workdir: Path, cores: Cores) -> tuple[Server, dict[str, str]]:
    """A moto server with an empty bucket, and the gateway settings that use it."""
    port = free_port()
    with open(workdir / "moto.log", "wb") as log:
        process = children.start(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            core=cores,
            stdout=log,
            stderr=log,
        )
    wait_until_listening(process, port, "moto")
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    import botocore.session  # only with --s3

    client = botocore.session.get_session().create_client(
        "s3",
        region_name=MOTO_REGION,
        endpoint_url=f"http://{HOST}:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    return Server("moto", port, process.pid), credentials | {
        "IMAGECACHE_BLOB_BACKEND": "s3",
        "IMAGECACHE_S3_BUCKET": BUCKET,
        "IMAGECACHE_AWS_REGION": MOTO_REGION,
        "IMAGECACHE_AWS_ENDPOINT_URL": f"http://{HOST}:{port}",
    }


def upload_all(port: int, images: list[bytes]) -> None:
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for _ in pool.map(lambda n: upload(port, key_of(n), images[n]), range(len(images))):
            pass


def link_blobs_for_nginx(data_dir: Path, html: Path) -> None:
    """``html/image/<key>``: hard links to the gateway's blob files (the very same files)."""
    (html / "image").mkdir(parents=True)
    with sqlite3.connect(data_dir / "imagecache.db") as database:
        rows = database.execute("SELECT key, blob_name FROM images").fetchall()
    for key, blob_name in rows:
        os.link(data_dir / "blobs" / blob_name[:2] / blob_name, html / "image" / key)


def start_nginx(children: Children, workdir: Path, data_dir: Path, cores: Cores) -> Server:
    prefix = workdir / "nginx"
    link_blobs_for_nginx(data_dir, prefix / "html")
    nginx, _ = start_nginx_on(children, prefix, 1, cores)
    return nginx


def start_floor(
    children: Children, workdir: Path, data_dir: Path, cores: Cores, node_mb: float, largest: int
) -> dict[str, System]:
    """memcached and the floor servers (bench/floorserver.py) on the gateway's files."""
    memcached = start_memcached(
        children, math.ceil(node_mb), largest, cores, smallest_item_limit=MEMCACHED_SLAB_CHUNK
    )
    systems = {}
    for name, (asks_memcached, fills) in FLOOR_VARIANTS.items():
        argv = [sys.executable, str(FLOOR_SERVER), "--database", str(data_dir / "imagecache.db")]
        argv += ["--blobs", str(data_dir / "blobs")]
        argv += ["--memcached", str(memcached.port)] if asks_memcached else []
        argv += ["--fill"] if fills else []
        with open(workdir / "floor.log", "ab") as log:
            process = children.start(argv, core=cores, stdout=subprocess.PIPE, stderr=log)
        port = int(read_ready_line(process, FLOOR_READY, name).group(1))
        pids = {"floor": process.pid} | ({"memcached": memcached.pid} if asks_memcached else {})
        systems[name] = System(name, port, "/", pids, 0)
    return systems


def counter(values: dict[int, dict[str, float]], pid: int, name: str) -> float:
    return values[pid].get(f"imagecache_gateway_{name}_total", 0.0)


def benchmark(children: Children, args: argparse.Namespace, workdir: Path) -> bool:
    wrk_binary = _binary("wrk")
    cores = args.server_cores
    progress(f"making {args.images:,} noise PNGs of about {args.size:,} B")
    images = [noise_png(args.size, IMAGE_SEED + n, IMAGE_WIDTH)[0] for n in range(args.images)]
    sizes = {len(image) for image in images}

    gateways: dict[str, tuple[Server, Server]] = {}
    node = start_node(children, workdir, cores, args.node_mb)
    kept = {} if args.kept_copies_mb is None else {"IMAGECACHE_KEPT_COPIES_MB": args.kept_copies_mb}
    gateway, _ = start_gateway(children, workdir, node, 1, cores, settings=kept)
    data_dir = gateway_data_dir(workdir, "gateway")
    gateways["imagecache"] = (gateway, node)
    if args.s3:
        moto, s3_settings = start_moto(children, workdir, args.client_cores)
        s3_node = start_node(children, workdir, cores, args.node_mb, "s3-node")
        s3_gateway, _ = start_gateway(
            children, workdir, s3_node, 1, cores, "s3-gateway", s3_settings | kept
        )
        gateways["imagecache-s3"] = (s3_gateway, s3_node)
        progress(f"moto (pid {moto.pid}) on port {moto.port}")
    for name, (server, its_node) in gateways.items():
        progress(f"uploading to {name} (pid {server.pid}, node pid {its_node.pid})")
        started = time.monotonic()
        upload_all(server.port, images)
        progress(f"  {args.images:,} uploads in {time.monotonic() - started:.1f} s")
    nginx = start_nginx(children, workdir, data_dir, cores)
    for number in (0, args.images - 1):
        for server in (*(g for g, _ in gateways.values()), nginx):
            check_response(server, f"/image/{key_of(number)}", images[number])

    systems: dict[str, System] = {
        name: System(name, server.port, "/", {"gateway": server.pid, "node": its_node.pid}, 0)
        for name, (server, its_node) in gateways.items()
    }
    systems["nginx"] = System("nginx", nginx.port, "/", {"nginx": nginx.pid}, 0)
    floor: dict[str, System] = {}
    if args.floor:
        floor = start_floor(children, workdir, data_dir, cores, args.node_mb, max(sizes))
        for name, system in floor.items():
            check_response(Server(name, system.port, 0), f"/image/{key_of(0)}", images[0])
        systems |= floor
    script = workdir / "random-keys.lua"
    script.write_text(random_keys_script(args.images))
    wrk = Wrk(wrk_binary, script, args.connections, 1)

    if args.warmup > 0:
        for system in systems.values():
            sample = run_wrk(children, wrk, system, args.warmup, args.client_cores)
            progress(f"warm-up  {system.name:<14} {sample.wrk.requests_per_second:>8,.0f} req/s")
    before = {
        name: gateway_counters(server.port, [server.pid]) for name, (server, _) in gateways.items()
    }
    cells = {name: Cell(system) for name, system in systems.items()}
    for number in range(1, args.rounds + 1):
        for name, system in systems.items():
            sample = run_wrk(children, wrk, system, args.duration, args.client_cores)
            cells[name].samples.append(sample)
            per_request = sample.server_cpu[next(iter(system.pids))] / max(1, sample.wrk.requests)
            progress(
                f"round {number}/{args.rounds}  {name:<14} {sample.wrk.requests_per_second:>8,.0f}"
                f" req/s  p99 {sample.wrk.latency[99] * 1000:.1f} ms"
                f"  {per_request * 1e6:,.0f} us CPU/request"
            )
    after = {
        name: gateway_counters(server.port, [server.pid]) for name, (server, _) in gateways.items()
    }

    nginx_cell = cells["nginx"]
    print()
    print(
        f"# cache misses: {args.images:,} noise PNGs of {min(sizes):,}-{max(sizes):,} B, a node of "
        f"{args.node_mb:g} MB, kept copies: {args.kept_copies_mb or 'the default'} MB, "
        f"wrk -t1 -c{args.connections} on random keys, "
        f"{args.rounds} x {args.duration:g} s each (A B A B); servers on {describe_cores(cores)}"
    )
    print_table_header(
        "| system | req/s | p50 ms | p99 ms | server CPU us/request | node CPU us/request "
        "| x nginx req/s | misses |"
    )
    ok = True
    for name, cell in cells.items():
        requests = cell.requests
        serving, *helpers = cell.system.pids  # the gateway, nginx or the floor; its cache
        server_cpu = cell.cpu(serving)
        node_cpu = f"{cell.cpu(helpers[0]) / requests * 1e6:,.0f}" if helpers else "-"
        misses = "-"
        if name in gateways:
            pid = gateways[name][0].pid
            counts = {
                metric: counter(after[name], pid, metric) - counter(before[name], pid, metric)
                for metric in (
                    "cache_hits",
                    "cache_misses",
                    "fast_path_handed_over",
                    "cache_node_errors",
                )
            }
            hits, missed = counts["cache_hits"], counts["cache_misses"]
            misses = (
                f"{ratio_of(missed, hits + missed):.1%} "
                f"({counts['fast_path_handed_over']:,.0f} handed to aiohttp, "
                f"{counts['cache_node_errors']:,.0f} node errors)"
            )
        errors = cell.bad_status + cell.socket_errors
        ok = ok and errors == 0 and requests > 0
        print(
            f"| {name} | {cell.throughput:,.0f} | {cell.latency_ms(50, median):.1f} "
            f"| {cell.latency_ms(99, median):.1f} | {server_cpu / requests * 1e6:,.0f} "
            f"| {node_cpu} | {ratio_of(cell.throughput, nginx_cell.throughput):.2f} | {misses} |"
            + (f" ERRORS {errors}" if errors else "")
        )
    gateway_cell = cells["imagecache"]
    cpu_per_miss = gateway_cell.cpu("gateway") / gateway_cell.requests * 1e6
    ratio = ratio_of(gateway_cell.throughput, nginx_cell.throughput)
    print()
    print(
        f"goal: gateway CPU per miss at most {GOAL_CPU_PER_MISS_US:.0f} us: "
        f"{cpu_per_miss:,.0f} us, {verdict(cpu_per_miss <= GOAL_CPU_PER_MISS_US)}"
    )
    print(
        f"goal: at least {GOAL_RATIO}x nginx's throughput: {ratio:.2f}x, "
        f"{verdict(ratio >= GOAL_RATIO)}"
    )
    if args.floor:
        filled = ratio_of(cells["floor: + GET + fill"].throughput, nginx_cell.throughput)
        unfilled = ratio_of(cells["floor: + memcached GET"].throughput, nginx_cell.throughput)
        print(
            f"floor: a bare Python server that asks memcached reaches {unfilled:.2f}x nginx, "
            f"{filled:.2f}x when it also stores every miss there"
        )
    if any(cell.bad_status + cell.socket_errors for name, cell in cells.items() if name in floor):
        show_log_tails(workdir, "floor.log")
    sizes_ok = all(
        min(sizes) * cell.requests <= sum(s.wrk.bytes_read for s in cell.samples)
        for cell in cells.values()
    )
    print(
        "checks: "
        + ("no error status or socket error, " if ok else "ERRORS (see the table), ")
        + ("every response at least an image's size" if sizes_ok else "SHORT RESPONSES")
    )
    sys.stdout.flush()
    if args.py_spy:
        progress(f"profiling the gateway for {args.profile_seconds:g} s with {args.py_spy}")
        profile = profile_gateway(children, args.py_spy, wrk, systems["imagecache"], args, workdir)
        print_profile(profile, gateway_cell, args)
    return ok and sizes_ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A B (2)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument("--images", type=int, default=1000, help="images uploaded (1000)")
    parser.add_argument("--size", type=parse_size, default=100 * KIB, help="image size (100K)")
    parser.add_argument("--node-mb", type=float, default=1.0, help="the node's capacity (1)")
    parser.add_argument(
        "--kept-copies-mb",
        metavar="MB",
        help="the gateways' kept copies (IMAGECACHE_KEPT_COPIES_MB; default: the gateway's)",
    )
    parser.add_argument("--s3", action="store_true", help="also through S3 on a moto server")
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="leave out the floor (bench/floorserver.py with memcached)",
    )
    parser.add_argument("--py-spy", metavar="PATH", help="afterwards, profile the gateway")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--profile-rate", type=int, default=100)
    args = parser.parse_args(argv)
    if min(args.rounds, args.connections, args.images, args.profile_rate) < 1 or args.duration < 1:
        parser.error("--rounds, --connections, --images must be positive, --duration at least 1 s")
    args.workers = 1  # what gateway.print_profile reads
    children = place_on_cores(args, 1)
    return run_guarded(
        lambda directory: 0 if benchmark(children, args, directory) else 1,
        prefix="bench-misses-",
        cleanup=children.close,
        stopped="every server stopped",
        on_failure=lambda directory: show_log_tails(
            directory,
            "node.log",
            "gateway.log",
            "s3-gateway.log",
            "moto.log",
            "nginx/error.log",
            "floor.log",
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
