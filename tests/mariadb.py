"""A real MariaDB server for the test session, on loopback, in a temporary folder.

Use it from a test module with::

    from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401

``mariadb_url`` (session) is the URL of a database on a server started once
per session; ``mariadb_database_url`` (per test) is the URL of a new, empty
database on that server, dropped after the test. Where ``mariadbd`` is not
installed the tests that need it are skipped, saying so; CI installs
mariadb-server, so there they always run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

USER = "imagecache"
PASSWORD = "imagecache-test"
DATABASE = "imagecache"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 3
_UNKNOWN_THREAD = 1094  # MariaDB's error for KILL of a connection that is gone
# Debian puts the server in /usr/sbin, which a non-root PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def _program(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class _PortTaken(Exception):
    pass


class MariaDBServer:
    """One ``mariadbd`` with its own data folder, socket and port."""

    def __init__(self, folder: Path, server: str, install_db: str, client: str) -> None:
        self.folder = folder
        self.socket = folder / "mariadb.sock"
        self.log = folder / "error.log"
        self.port = free_port()
        self._server = server
        self._install_db = install_db
        self._client = client
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Initialize the data folder, start the server and create the test user.

        Raises RuntimeError, with the server's log, when it does not come up.
        """
        data = self.folder / "data"
        installed = subprocess.run(
            [
                self._install_db,
                "--no-defaults",
                "--user=root",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        if installed.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed ({installed.returncode}):\n"
                f"{installed.stdout}\n{installed.stderr}"
            )
        # The free port may be taken before the server binds it (other test runs
        # on this machine): then start again on another one.
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._launch(data)
            try:
                self._wait_until_ready()
                break
            except _PortTaken:
                if attempt == _PORT_ATTEMPTS:
                    raise RuntimeError(
                        f"mariadbd found no free port:\n{self._log_tail()}"
                    ) from None
                self.port = free_port()
        self.run_sql(
            f"CREATE DATABASE {DATABASE};"
            f" CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';"
            f" GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'127.0.0.1';"
        )

    def _launch(self, data: Path) -> None:
        self.log.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [
                self._server,
                "--no-defaults",  # nothing from /etc/mysql: this server is ours alone
                "--user=root",
                f"--datadir={data}",
                f"--socket={self.socket}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--log-error={self.log}",
                f"--pid-file={self.folder / 'mariadbd.pid'}",
                # Test data need not survive a power cut.
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=64M",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"mysql+aiomysql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def run_sql(self, sql: str) -> subprocess.CompletedProcess[str]:
        """Run ``sql`` as root over the socket; raises RuntimeError when it fails."""
        done = self._client_run(sql)
        if done.returncode != 0:
            raise RuntimeError(f"mariadb client failed on {sql!r}: {done.stderr.strip()}")
        return done

    def stop(self) -> None:
        """SIGTERM the server and wait for it (kill it if it does not stop)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _client_run(self, sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self._client, "--no-defaults", "-uroot", f"--socket={self.socket}", "-e", sql],
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT_S,
        )

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            code = self._process.poll()
            if code is not None:
                if "Address already in use" in self._log_tail():
                    raise _PortTaken
                raise RuntimeError(f"mariadbd exited with {code} at start-up:\n{self._log_tail()}")
            if self.socket.exists() and self._client_run("SELECT 1").returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mariadbd did not accept connections within {START_TIMEOUT_S:.0f} s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no server log: {error})"


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """``mysql+aiomysql://...`` of a database on a MariaDB server run for this session."""
    server, install_db, client = (
        _program(name) for name in ("mariadbd", "mariadb-install-db", "mariadb")
    )
    if server is None or install_db is None or client is None:
        pytest.skip(
            "MariaDB is not installed here (mariadbd, mariadb-install-db, mariadb): "
            "the MySQL tests need it; CI installs mariadb-server "
            "(apt-get install -y mariadb-server)"
        )
    folder = Path(tempfile.mkdtemp(prefix="imagecache-mariadb-"))
    instance = MariaDBServer(folder, server, install_db, client)
    try:
        instance.start()
        yield instance.url
    finally:
        instance.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def mariadb_database_url(mariadb_url: str) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    # The test user may create databases; pymysql (aiomysql's own driver) does it synchronously.
    admin = create_engine(
        make_url(mariadb_url).set(drivername="mysql+pymysql"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}`"))
        yield make_url(mariadb_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            # A test that failed may have left connections (and their locks) behind:
            # DROP DATABASE would wait for them forever.
            leftovers = conn.execute(
                text(
                    "SELECT id FROM information_schema.processlist"
                    " WHERE db = :db AND id <> CONNECTION_ID()"
                ),
                {"db": name},
            ).scalars()
            for connection_id in list(leftovers):
                try:
                    conn.execute(text(f"KILL {int(connection_id)}"))
                except OperationalError as error:
                    if error.orig is None or error.orig.args[0] != _UNKNOWN_THREAD:
                        raise  # otherwise it went away by itself meanwhile
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    finally:
        admin.dispose()
