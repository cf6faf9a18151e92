"""A real manager app for tests of the miss curve: a local pool of node
processes, the password and token of tests.test_manager, every key sampled."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aiohttp.test_utils import TestServer

from imagecache.config import Config, with_data_dir
from manager.app import create_app as create_manager
from manager.appkeys import CURVES
from manager.curves import MissCurves
from tests.processes import early_in_a_minute
from tests.test_manager import PASSWORD, TOKEN, free_port_range


async def sampling_manager(tmp_path: Path) -> tuple[Config, TestServer]:
    """The configuration (its data under ``tmp_path``) and the server, not yet
    started, of a manager whose miss curve samples every key (the rate it also
    tells the gateways); returned early enough in a minute that the curve's
    first window lasts the test."""
    await early_in_a_minute()
    base = with_data_dir(Config(), tmp_path / "data")
    config = replace(
        base,
        gateway=replace(base.gateway, manager_token=TOKEN),
        manager=replace(base.manager, password=PASSWORD, first_port=free_port_range()),
    )
    app = create_manager(config)
    app[CURVES] = MissCurves(rate=1.0)
    return config, TestServer(app, host="127.0.0.1")
