"""The manager's web app against hostile clients: bad bodies, redirects, sessions, floods.

Each test runs a real manager (with its local pool of one node process) on a
loopback port and talks HTTP to it. Clients from other addresses bind to
127.0.0.2 and up (all of 127/8 is loopback on Linux).
"""

from __future__ import annotations

import asyncio
import http.client
import io
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import ClientSession, CookieJar, web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache.config import Config, with_data_dir
from manager.app import create_app as create_manager
from manager.appkeys import CONTROLLER, LOGIN_THROTTLE
from manager.auth import (
    FREE_FAILURES,
    MAX_DELAY_SECONDS,
    MAX_WAITING_HASHES,
    REFUSAL_DELAY_SECONDS,
    SESSION_COOKIE,
    LoginThrottle,
    Sessions,
)
from tests.test_manager import free_port_range

PASSWORD = "correct horse"
TOKEN = "gateway-token-for-tests"
# The forms an operator posts, and what each takes.
FORM_PATHS = ("/config/settings", "/config/resize", "/config/clear", "/config/delete_all")


def manager_config(tmp_path: Path) -> Config:
    base = with_data_dir(Config(), tmp_path / "data")
    return replace(
        base,
        gateway=replace(base.gateway, manager_token=TOKEN),
        manager=replace(base.manager, password=PASSWORD, first_port=free_port_range()),
    )


@dataclass
class Manager:
    server: TestServer
    http: ClientSession  # from 127.0.0.1, with a cookie jar

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def log_in(self, http: ClientSession | None = None) -> str:
        """Log ``http`` (by default self.http) in; the page's CSRF token."""
        async with (http or self.http).post(
            self.url("/login"), data={"password": PASSWORD, "next": "/config"}
        ) as reply:
            assert reply.status == 200, await reply.text()
            page = await reply.text()
        return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[Manager]:
    server = TestServer(create_manager(manager_config(tmp_path)), host="127.0.0.1")
    async with (
        server,
        # unsafe: keep cookies of an IP address host (the test server is on 127.0.0.1).
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        yield Manager(server, http)


@asynccontextmanager
async def client_from(address: str) -> AsyncIterator[ClientSession]:
    """A client whose connections come from ``address`` (a loopback address)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    async with ClientSession(connector=connector, cookie_jar=CookieJar(unsafe=True)) as http:
        yield http


# --- malformed form bodies -------------------------------------------------------------

MALFORMED_BODIES = {
    "multipart without a boundary": ("multipart/form-data", b"garbage"),
    "boundary absent from the body": ("multipart/form-data; boundary=zz", b"garbage"),
    "unterminated multipart": (
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="password"\r\n\r\nabc',
    ),
    "urlencoded, not UTF-8": ("application/x-www-form-urlencoded", b"password=\xff\xfe"),
    "unknown charset": ("application/x-www-form-urlencoded; charset=klingon", b"a=b"),
    "unknown transfer encoding": (
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="csrf"\r\n'
        b"Content-Transfer-Encoding: rot13\r\n\r\nabc\r\n--zz--\r\n",
    ),
    # Found by the fuzz in CI: aiohttp warns, and warnings are errors in the tests.
    "unparseable Content-Disposition": (
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name=")C*;}?k1"-pm<2(FQE; filename="f.txt"\r\n'
        b"\r\nabc\r\n--zz--\r\n",
    ),
}


@pytest.mark.parametrize("kind", MALFORMED_BODIES)
async def test_malformed_form_bodies_are_answered_400_with_one_log_line(
    manager: Manager, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    content_type, body = MALFORMED_BODIES[kind]
    await manager.log_in()
    controller = manager.server.app[CONTROLLER]
    settings_before = await controller.settings()
    caplog.set_level(logging.WARNING)
    for path in ("/login", "/logout", *FORM_PATHS, "/internal/configure_cache"):
        caplog.clear()
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
        async with manager.http.post(manager.url(path), data=body, headers=headers) as reply:
            assert reply.status == 400, f"{path}: {reply.status} {await reply.text()}"
            if path.startswith("/internal/"):
                answer = await reply.json()
                assert answer["error"]["code"] == 400
        problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(problems) == 1, f"{path}: {[r.getMessage() for r in problems]}"
        assert problems[0].levelno == logging.WARNING
        assert problems[0].exc_info is None
        assert "malformed form body" in problems[0].getMessage()
    # Nothing changed: the session (logout was refused), the pool, the settings.
    async with manager.http.get(manager.url("/config"), allow_redirects=False) as reply:
        assert reply.status == 200
    assert controller.size == 1
    assert await controller.settings() == settings_before


async def test_bodies_past_the_size_limit_are_answered_413(manager: Manager) -> None:
    big = b"x" * (2 << 20)  # aiohttp's client_max_size is 1 MiB
    form = aiohttp.FormData()
    form.add_field("password", "wrong")
    form.add_field("upload", io.BytesIO(big), filename="big.bin")
    async with manager.http.post(manager.url("/login"), data=form) as reply:
        assert reply.status == 413
    urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}
    async with manager.http.post(
        manager.url("/login"), data=io.BytesIO(b"password=" + big), headers=urlencoded
    ) as reply:
        assert reply.status == 413


async def test_a_csrf_token_beyond_ascii_is_refused_not_a_crash(manager: Manager) -> None:
    await manager.log_in()
    async with manager.http.post(manager.url("/config/clear"), data={"csrf": "é"}) as reply:
        assert reply.status == 403


async def test_a_node_count_of_unicode_digits_is_refused(manager: Manager) -> None:
    csrf = await manager.log_in()
    form = {"csrf": csrf, "direction": "shrink", "count": "²"}
    async with manager.http.post(manager.url("/config/resize"), data=form) as reply:
        assert reply.status == 200  # the configuration page again, with the error
        assert "Give a whole number of nodes" in await reply.text()
    assert manager.server.app[CONTROLLER].size == 1


# --- where a login leads -------------------------------------------------------------

OFF_SITE = [
    "/\\evil.example/",
    "/\t/evil.example",
    "/\n/evil.example",
    "//evil.example",
    "///evil.example",
    "/./\\evil.example",
    "https://evil.example/",
    "javascript:alert(1)",
    "evil.example",
    " /config",
    "/config\r\nSet-Cookie: x=y",
    "",
]


async def test_a_login_leads_only_to_the_managers_own_paths(manager: Manager) -> None:
    for target in OFF_SITE:
        async with manager.http.post(
            manager.url("/login"),
            data={"password": PASSWORD, "next": target},
            allow_redirects=False,
        ) as reply:
            assert (reply.status, reply.headers.get("Location")) == (303, "/config"), target
        async with manager.http.get(manager.url("/login"), params={"next": target}) as reply:
            assert 'name="next" value="/config"' in await reply.text(), target
    for target in ("/stats", "/activity?from=login", "/config"):
        async with manager.http.post(
            manager.url("/login"),
            data={"password": PASSWORD, "next": target},
            allow_redirects=False,
        ) as reply:
            assert (reply.status, reply.headers.get("Location")) == (303, target)


async def test_the_way_to_the_login_keeps_the_page_asked_for(manager: Manager) -> None:
    async with ClientSession() as anonymous:
        async with anonymous.get(manager.url("/stats?x=1&y=2"), allow_redirects=False) as reply:
            assert reply.status == 303
            location = reply.headers["Location"]
        async with anonymous.get(manager.url(location)) as reply:
            assert 'name="next" value="/stats?x=1&amp;y=2"' in await reply.text()


# --- logout --------------------------------------------------------------------------


async def test_logout_ends_the_session_on_the_server(manager: Manager) -> None:
    csrf = await manager.log_in()
    cookie = manager.http.cookie_jar.filter_cookies(manager.server.make_url("/"))[SESSION_COOKIE]
    old = {SESSION_COOKIE: cookie.value}
    async with manager.http.post(
        manager.url("/logout"), data={"csrf": csrf}, allow_redirects=False
    ) as reply:
        assert reply.status == 303
    # A client that kept the cookie (copied, stolen, or a browser that ignored
    # the deletion) gets nothing more with it.
    async with ClientSession(cookies=old, cookie_jar=CookieJar(unsafe=True)) as kept:
        async with kept.get(manager.url("/config"), allow_redirects=False) as reply:
            assert reply.status == 303
            assert reply.headers["Location"].startswith("/login")
        async with kept.post(manager.url("/config/clear"), data={"csrf": csrf}) as reply:
            assert reply.status == 401
    # A new login works as before.
    await manager.log_in()


def test_live_sessions_are_bounded() -> None:
    sessions = Sessions(b"secret", max_sessions=2)
    first, second, third = (sessions.new_cookie() for _ in range(3))
    assert sessions.session_id(first) is None  # the oldest login ended
    assert sessions.session_id(second) is not None
    assert sessions.session_id(third) is not None


# --- wrong passwords -----------------------------------------------------------------


async def post_password(http: ClientSession, url: str, password: str) -> aiohttp.ClientResponse:
    async with http.post(
        url, data={"password": password, "next": "/config"}, allow_redirects=False
    ) as reply:
        await reply.read()
        return reply


async def test_wrong_passwords_are_throttled_per_client_address(manager: Manager) -> None:
    url = manager.url("/login")
    for _ in range(FREE_FAILURES):
        assert (await post_password(manager.http, url, "wrong")).status == 401
    started = time.monotonic()
    shut_out = await post_password(manager.http, url, "wrong")
    assert shut_out.status == 429
    assert shut_out.headers["Retry-After"] == "1"
    # Answered only after a delay: a client retrying at once cannot flood the loop.
    assert time.monotonic() - started >= REFUSAL_DELAY_SECONDS * 0.9
    # While it waits, not even the right password gets in (or guessing would go on).
    assert (await post_password(manager.http, url, PASSWORD)).status == 429
    # Another address is not held back by this one.
    async with client_from("127.0.0.2") as other:
        assert (await post_password(other, url, "wrong")).status == 401
        assert (await post_password(other, url, PASSWORD)).status == 303
    # The wait doubles with each further wrong password.
    await asyncio.sleep(1.05)
    assert (await post_password(manager.http, url, "wrong")).status == 401
    again = await post_password(manager.http, url, "wrong")
    assert (again.status, again.headers["Retry-After"]) == (429, "2")
    await asyncio.sleep(2.05)
    # A success forgets the failures: the free tries are there again.
    assert (await post_password(manager.http, url, PASSWORD)).status == 303
    for _ in range(FREE_FAILURES):
        assert (await post_password(manager.http, url, "wrong")).status == 401


def test_the_throttle_backs_off_exponentially_up_to_a_cap_in_bounded_memory() -> None:
    now = [1000.0]
    throttle = LoginThrottle(max_clients=3, clock=lambda: now[0])
    waits = []
    for _ in range(FREE_FAILURES + 12):
        assert throttle.attempt("10.0.0.1") == 0.0
        waits.append(throttle.waiting("10.0.0.1"))
        now[0] += waits[-1]
    assert waits[: FREE_FAILURES - 1] == [0.0] * (FREE_FAILURES - 1)
    assert waits[FREE_FAILURES - 1 : FREE_FAILURES + 3] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == MAX_DELAY_SECONDS == waits[-1]
    for client in range(100):
        throttle.attempt(f"10.0.1.{client}")
    assert len(throttle) == 3


# --- the event loop during a login flood ---------------------------------------------


def thread_cpu_seconds(native_id: int) -> float:
    """User and system CPU time of one thread of this process (Linux /proc)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


async def test_password_hashing_leaves_the_event_loop_free(manager: Manager) -> None:
    """Many wrong passwords at once, from many addresses: the hashing is done by
    the manager's one hashing thread, not on the event loop (which the test and
    the manager share), and the excess is told to come back.

    Judged by where the CPU time went, not by how long anything took: a busy
    machine slows both alike, so wall-clock stalls would make this flaky.
    """
    url = manager.url("/login")

    async def guess(address: str) -> tuple[int, str | None]:
        async with client_from(address) as http:
            reply = await post_password(http, url, "wrong")
            return reply.status, reply.headers.get("Retry-After")

    loop_cpu_before = thread_cpu_seconds(threading.get_native_id())
    answers = await asyncio.gather(*(guess(f"127.0.1.{n}") for n in range(1, 41)))
    loop_cpu = thread_cpu_seconds(threading.get_native_id()) - loop_cpu_before
    hashing_threads = [t for t in threading.enumerate() if t.name.startswith("manager-password")]
    assert len(hashing_threads) == 1
    hashed = sum(1 for status, _ in answers if status == 401)
    native_id = hashing_threads[0].native_id
    assert native_id is not None
    # scrypt (n=2**14, r=8) costs tens of ms of CPU a hash; HTTP handling a fraction of a ms.
    hashing_cpu = thread_cpu_seconds(native_id)
    assert hashing_cpu >= hashed * 0.005, (hashing_cpu, hashed)
    assert loop_cpu < hashing_cpu, (loop_cpu, hashing_cpu)
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) <= {401, 503}, statuses
    assert statuses.count(503) >= 40 - MAX_WAITING_HASHES - 1, statuses  # about 16 wait
    assert all(after == "1" for status, after in answers if status == 503)


# --- security headers ----------------------------------------------------------------

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


async def test_every_answer_carries_the_security_headers(manager: Manager) -> None:
    requests = [("GET", "/login"), ("GET", "/static/style.css"), ("GET", "/config")]
    requests += [("GET", "/no/such/page"), ("POST", "/login"), ("GET", "/metrics")]
    requests += [("POST", "/config/clear"), ("POST", "/internal/getNumNodes")]

    async def check(http: ClientSession) -> None:
        for method, path in requests:
            async with http.request(method, manager.url(path), allow_redirects=False) as reply:
                for name, value in SECURITY_HEADERS.items():
                    assert reply.headers.get(name) == value, (method, path, reply.status, name)
                policy = reply.headers.get("Content-Security-Policy", "")
                assert "frame-ancestors 'none'" in policy, (method, path)
                # The dashboard's own inline script and styles must keep working.
                assert "script-src" not in policy
                assert "default-src" not in policy

    await check(manager.http)
    await manager.log_in()
    requests += [("GET", "/stats"), ("GET", "/stats/charts"), ("GET", "/activity")]
    await check(manager.http)


# --- fuzzing the forms ---------------------------------------------------------------


@dataclass
class ThreadedManager:
    """A manager serving from a thread of its own, for synchronous (hypothesis) clients."""

    port: int
    cookie: str
    csrf: str


@pytest.fixture
def threaded_manager(tmp_path: Path) -> Iterator[ThreadedManager]:
    loop = asyncio.new_event_loop()
    app = create_manager(manager_config(tmp_path))
    # 429s at once: the fuzz posts to /login from one address, thousands of times.
    app[LOGIN_THROTTLE] = LoginThrottle(refusal_delay=0)
    runner = web.AppRunner(app)
    ready = threading.Event()
    ports: list[int] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        ports.append(server.sockets[0].getsockname()[1])
        ready.set()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name="fuzzed-manager", daemon=True)
    thread.start()
    assert ready.wait(30), "the manager did not start"
    try:
        connection = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=10)
        connection.request(
            "POST",
            "/login",
            urlencode({"password": PASSWORD}),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        reply = connection.getresponse()
        reply.read()
        cookie = reply.headers["Set-Cookie"].split(";", 1)[0]
        connection.request("GET", "/config", headers={"Cookie": cookie})
        page = connection.getresponse().read().decode()
        connection.close()
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        yield ThreadedManager(ports[0], cookie, csrf)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


# Replaced by the logged-in session's CSRF token in every body posted.
CSRF_SLOT = "@csrf@"
FIELD_NAMES = ["password", "next", "csrf", "direction", "count", "confirm", "cacheSize"]
FIELD_NAMES += ["policy", "mode", "maxMiss", "minMiss", "expRatio", "shrinkRatio", "x"]
# Values the forms know (never "expand": new node processes would only slow the fuzz).
KNOWN_VALUES = ["shrink", "1", "0", "-1", "8", "1e308", "nan", "LRU", "RR", "auto", "manual"]
KNOWN_VALUES += ["delete", "/config", "//evil.example", PASSWORD, "0.5", "", CSRF_SLOT]
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
PART_HEADER_VALUES = ["text/plain; charset=latin-1", "text/plain; charset=bogus", "base64"]
PART_HEADER_VALUES += ["gzip", "quoted-printable", "deflate", "application/octet-stream", "-1"]
PART_HEADERS = st.dictionaries(
    st.sampled_from(
        ["Content-Type", "Content-Transfer-Encoding", "Content-Encoding", "Content-Length", "X"]
    ),
    st.one_of(
        st.sampled_from(PART_HEADER_VALUES),
        HEADER_TEXT,
    ),
    max_size=3,
)


KNOWN_BYTES = st.sampled_from(KNOWN_VALUES).map(str.encode)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(st.sampled_from(["zz", "----b0undary", "a" * 70, "x y"]))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.sampled_from(FIELD_NAMES), HEADER_TEXT))
        disposition = draw(
            st.sampled_from(
                [
                    f'form-data; name="{name}"',
                    f'form-data; name="{name}"; filename="f.txt"',
                    "form-data",
                    "attachment",
                ]
            )
        )
        headers = {"Content-Disposition": disposition, **draw(PART_HEADERS)}
        value = draw(
            st.one_of(st.sampled_from(KNOWN_VALUES).map(str.encode), st.binary(max_size=40))
        )
        head = "".join(f"{key}: {text}\r\n" for key, text in headers.items()).encode()
        parts.append(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n" + value + b"\r\n")
    ending = draw(st.sampled_from([f"--{boundary}--\r\n", "", f"--{boundary}", "--zz--"]))
    content_type = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={boundary}",
                f'multipart/form-data; boundary="{boundary}"',
                "multipart/form-data",
                "multipart/mixed; boundary=zz",
            ]
        )
    )
    return content_type, b"".join(parts) + ending.encode()


@st.composite
def urlencoded_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    fields = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10)),
                st.one_of(st.sampled_from(KNOWN_VALUES), st.text(max_size=20)),
            ),
            max_size=5,
        )
    )
    body = urlencode(fields, encoding="utf-8", errors="surrogatepass").encode()
    body = draw(st.one_of(st.just(body), st.binary(max_size=60)))
    charset = draw(st.sampled_from(["", "; charset=utf-8", "; charset=latin-1", "; charset=x"]))
    return "application/x-www-form-urlencoded" + charset, body


ANY_BODY = st.one_of(
    multipart_bodies(),
    urlencoded_bodies(),
    st.tuples(st.one_of(HEADER_TEXT, st.just("text/plain")), st.binary(max_size=80)),
)


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(
    path=st.sampled_from(["/login", "/logout", *FORM_PATHS]),
    logged_in=st.booleans(),
    right_csrf=st.booleans(),
    body=ANY_BODY,
    extra_headers=st.dictionaries(
        st.sampled_from(["Content-Encoding", "Transfer-Encoding", "Accept", "X-Forwarded-For"]),
        HEADER_TEXT,
        max_size=2,
    ),
)
def test_no_form_post_makes_the_manager_fail(
    threaded_manager: ThreadedManager,
    path: str,
    logged_in: bool,
    right_csrf: bool,
    body: tuple[str, bytes],
    extra_headers: dict[str, str],
) -> None:
    """Whatever is posted to a form, the answer is 2xx, 3xx or 4xx, never 5xx."""
    content_type, payload = body
    # Not on /logout: a logout would end the session the fuzz goes on with.
    csrf = "not-the-token" if path == "/logout" else threaded_manager.csrf
    payload = payload.replace(CSRF_SLOT.encode(), csrf.encode())
    if right_csrf and content_type.startswith("application/x-www-form-urlencoded"):
        payload = f"csrf={csrf}&".encode() + payload
    headers = {**extra_headers, "Content-Type": content_type}
    if logged_in:
        headers["Cookie"] = threaded_manager.cookie
    headers.pop("Transfer-Encoding", None)  # http.client frames the body itself
    connection = http.client.HTTPConnection("127.0.0.1", threaded_manager.port, timeout=10)
    try:
        connection.request("POST", path, payload, headers)
        status = connection.getresponse().status
    finally:
        connection.close()
    assert status < 500, (path, content_type, payload[:200], headers)
