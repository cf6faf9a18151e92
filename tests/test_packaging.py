"""The package as a user installs it: a wheel built from this checkout, installed
into a fresh virtualenv, serving both apps from a directory far from the source.

Nothing is downloaded: the wheel is built with the test environment's own
setuptools (``--no-build-isolation``, which would otherwise fetch setuptools
into a throwaway environment), installed with ``--no-index --no-deps``, and the
fresh virtualenv reaches the test environment's third-party packages through a
``.pth`` file that comes after its own site-packages, so imagecache itself can
only come from the wheel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout

from tests import processes

ROOT = Path(__file__).resolve().parents[1]
# What a build reads: the package definition, the README (its long description),
# the sources and the templates.
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "src", "templates")
START_SECONDS = 45.0
STOP_SECONDS = 15.0
BANNER = "imagecache is up"


def run(*command: str | Path, cwd: Path | None = None) -> str:
    """Run ``command`` without IMAGECACHE_* settings or PYTHONPATH; its output, or fail with it."""
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def clean_environment() -> dict[str, str]:
    """This environment without what could make a child import the source tree
    (PYTHONPATH, a virtualenv's variables) or configure the system."""
    leaks = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    return {
        name: value
        for name, value in os.environ.items()
        if name not in leaks and not name.startswith("IMAGECACHE_")
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout's build inputs (the build writes
    egg-info and build/ next to its sources: not into the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "--wheel-dir",
        out,
        source,
    )
    [built] = out.glob("imagecache-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed; the test environment's
    third-party packages after its own."""
    home = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", home)
    python = home / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    site_packages = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    )
    # Added only now: pip must not see the editable imagecache of the test environment.
    # A path in a .pth file goes to the end of sys.path, after the venv's own packages.
    (site_packages / "zz-test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return home


def test_the_wheel_carries_every_package_the_templates_and_static_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())

    # Every module under src/, so a package that setup.cfg does not list is caught here.
    modules = {str(path.relative_to(ROOT / "src")) for path in (ROOT / "src").rglob("*.py")}
    assert modules - names == set()
    templates = {
        "imagecache/templates/" + str(path.relative_to(ROOT / "templates"))
        for path in (ROOT / "templates").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {"imagecache/templates/static/style.css", "imagecache/templates/manager/login.html"} <= (
        templates
    )
    assert templates - names == set()


@contextlib.asynccontextmanager
async def installed_up(venv: Path, workdir: Path) -> AsyncIterator[tuple[str, str]]:
    """``<venv>/bin/imagecache up`` in ``workdir`` on free ports until its banner;
    yields the gateway's and the manager's URLs; stopped with SIGINT, killed if need be."""
    (gateway_port, manager_port), first_node_port = processes.free_ports(2, node_ports=20)
    environment = clean_environment() | {
        "PYTHONUNBUFFERED": "1",
        "IMAGECACHE_GATEWAY_PORT": str(gateway_port),
        "IMAGECACHE_MANAGER_PORT": str(manager_port),
        "IMAGECACHE_FIRST_NODE_PORT": str(first_node_port),
        "IMAGECACHE_MANAGER_URL": f"http://127.0.0.1:{manager_port}",
    }
    process = await asyncio.create_subprocess_exec(
        venv / "bin" / "imagecache",
        "up",
        cwd=workdir,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group, nodes included, to clean up
    )
    printed: list[str] = []

    async def read_until_banner() -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            printed.append(line.decode(errors="replace"))
            if BANNER in printed[-1]:
                return
        pytest.fail(f"imagecache up exited before its banner:\n{''.join(printed)}")

    try:
        try:
            await asyncio.wait_for(read_until_banner(), START_SECONDS)
        except TimeoutError:
            pytest.fail(f"no {BANNER!r} within {START_SECONDS:g} s:\n{''.join(printed)}")
        yield f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{manager_port}"
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.communicate(), STOP_SECONDS)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the nodes too, whatever happened
        await process.wait()


async def test_the_installed_package_serves_both_apps_from_another_directory(
    venv: Path, tmp_path: Path
) -> None:
    python = venv / "bin" / "python"
    where = run(python, "-c", "import imagecache, manager; print(imagecache.__file__)")
    assert Path(where.strip()).is_relative_to(venv), where
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    async with (
        installed_up(venv, workdir) as (gateway, manager),
        ClientSession(timeout=ClientTimeout(total=15)) as http,
    ):
        async with http.get(f"{gateway}/") as home:
            page = await home.text()
            assert home.status == 200, page
        [stylesheet] = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page)
        async with http.get(gateway + stylesheet) as style:
            assert style.status == 200
            assert "{" in await style.text()
        async with http.get(f"{manager}/login") as login:
            assert login.status == 200, await login.text()
            assert "<form" in await login.text()
        async with http.get(f"{manager}/static/dashboard.js") as script:
            assert script.status == 200

    # The data directory is the working directory's, not the package's.
    assert (workdir / "imagecache-data").is_dir()
