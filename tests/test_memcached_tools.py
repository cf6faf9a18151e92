"""Debian's libmemcached-tools (memcstat, memcdump, memccat, ...) against a node process.

Each test sets keys over the text protocol with pymemcache, runs the tools as
subprocesses and checks what they print and what they change. The tools skip
when libmemcached-tools is not installed (scripts/system-packages installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymemcache.client.base import Client as MemcacheClient

from cachenode import __version__
from tests.conftest import NodeProcess

TOOL_SECONDS = 20


@pytest.fixture
def memcache(node_process: NodeProcess) -> Iterator[MemcacheClient]:
    client = MemcacheClient((node_process.host, node_process.port), timeout=10)
    yield client
    client.close()


def run_tool(node: NodeProcess, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one of libmemcached's tools against ``node`` and check that it succeeded."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package libmemcached-tools)")
    finished = subprocess.run(
        [path, f"--servers={node.host}:{node.port}", *args],
        capture_output=True,
        text=True,
        timeout=TOOL_SECONDS,
        check=False,
    )
    assert finished.returncode == 0, f"{name} failed: {finished.stderr}{finished.stdout}"
    return finished


def dumped_keys(node: NodeProcess) -> list[str]:
    """The keys memcdump lists, one a line, in its order."""
    return run_tool(node, "memcdump").stdout.splitlines()


def memcstat_values(node: NodeProcess, *args: str) -> dict[str, str]:
    """memcstat's ``\\tname: value`` lines as a dict."""
    output = run_tool(node, "memcstat", *args).stdout
    assert output.startswith(f"Server: {node.host} ({node.port})\n")
    pairs = (line.strip().split(": ", 1) for line in output.splitlines()[1:])
    return {name: value for name, value in pairs}


def set_keys(client: MemcacheClient, values: dict[str, bytes]) -> None:
    for key, value in values.items():
        assert client.set(key, value, noreply=False) is True


def test_memcstat_reports_the_version_and_counters(
    node_process: NodeProcess, memcache: MemcacheClient
) -> None:
    set_keys(memcache, {"a": b"1", "b": b"22", "c": b"333"})
    assert memcache.get("a") == b"1"
    stats = memcstat_values(node_process)
    assert stats["version"] == f"1.6.0-imagecache-{__version__}"
    assert (stats["curr_items"], stats["cmd_set"], stats["get_hits"]) == ("3", "3", "1")
    assert stats["limit_maxbytes"] == str(64 * 1024 * 1024)
    # --server-version prints (to stderr) the release the tools parsed from the version.
    assert run_tool(node_process, "memcstat", "--server-version").stderr == (
        f"{node_process.host}:{node_process.port} 1.6.0\n"
    )


def test_memcstat_items_and_slabs_show_one_slab_class(
    node_process: NodeProcess, memcache: MemcacheClient
) -> None:
    set_keys(memcache, {"a": b"1", "b": b"22"})
    items = memcstat_values(node_process, "items")
    assert items["items:1:number"] == "2"
    slabs = memcstat_values(node_process, "slabs")
    assert (slabs["active_slabs"], slabs["1:used_chunks"]) == ("1", "2")


def test_memcdump_lists_every_key(node_process: NodeProcess, memcache: MemcacheClient) -> None:
    values = {f"key-{number}": b"v" * number for number in range(1, 301)}
    set_keys(memcache, values)
    keys = dumped_keys(node_process)
    assert sorted(keys) == sorted(values)
    memcache.delete("key-7", noreply=False)
    assert "key-7" not in dumped_keys(node_process)


def test_memccat_prints_the_values_of_the_dumped_keys(
    node_process: NodeProcess, memcache: MemcacheClient
) -> None:
    values = {"greeting": b"hello", "farewell": b"goodbye", "answer": b"42"}
    set_keys(memcache, values)
    keys = dumped_keys(node_process)
    assert sorted(keys) == sorted(values)
    # memccat writes each value followed by a newline, in the order asked.
    expected = "".join(values[key].decode() + "\n" for key in keys)
    assert run_tool(node_process, "memccat", *keys).stdout == expected


def test_memcflush_empties_the_node(node_process: NodeProcess, memcache: MemcacheClient) -> None:
    set_keys(memcache, {"a": b"1", "b": b"2"})
    assert len(dumped_keys(node_process)) == 2
    run_tool(node_process, "memcflush")
    assert dumped_keys(node_process) == []
    assert memcstat_values(node_process)["curr_items"] == "0"
    assert memcache.get("a") is None


def test_memccp_stores_a_file_and_memcrm_removes_it(
    node_process: NodeProcess, memcache: MemcacheClient, tmp_path: Path
) -> None:
    file = tmp_path / "notes.txt"
    file.write_bytes(b"some notes\n")
    run_tool(node_process, "memccp", str(file))
    assert dumped_keys(node_process) == ["notes.txt"]  # memccp keys a file by its name
    assert memcache.get("notes.txt") == b"some notes\n"
    run_tool(node_process, "memcrm", "notes.txt")
    assert dumped_keys(node_process) == []
    assert memcache.get("notes.txt") is None


def test_memcping_reaches_the_node(node_process: NodeProcess) -> None:
    run_tool(node_process, "memcping")  # it asks for the version, then says nothing
