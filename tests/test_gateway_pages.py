"""The web pages over HTTP: add (new and replace), show, keys, and bad input."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import image_bytes

Client = TestClient[web.Request, web.Application]
JPEG = image_bytes("JPEG", (30, 20), "purple")


def form(key: str, data: bytes, filename: str = "photo.jpeg") -> aiohttp.FormData:
    upload = aiohttp.FormData()
    upload.add_field("key", key)
    upload.add_field("file", data, filename=filename, content_type="image/jpeg")
    return upload


async def test_pages_render_with_navigation(gateway: Client) -> None:
    for path, heading in (("/", "Add image"), ("/show", "Show image"), ("/keys", "Keys")):
        response = await gateway.get(path)
        assert response.status == 200
        html = await response.text()
        assert f"<h1>{heading}</h1>" in html
        assert 'href="/keys"' in html
        assert 'href="/static/style.css"' in html
    assert "No images yet" in await (await gateway.get("/keys")).text()
    css = await gateway.get("/static/style.css")
    assert css.status == 200


async def test_adding_then_replacing_says_which_happened(gateway: Client) -> None:
    first = await gateway.post("/", data=form("sunset", JPEG))
    assert first.status == 200  # after the redirect to the image
    assert str(first.url).endswith("/show?key=sunset")
    html = await first.text()
    assert "Stored a new image under key &#39;sunset&#39;." in html
    assert '<img id="picture" src="/image/sunset' in html
    # The message is shown once.
    assert "Stored a new image" not in await (await gateway.get("/show?key=sunset")).text()
    second = await gateway.post("/", data=form("sunset", image_bytes("PNG"), "other.png"))
    assert "Replaced the image of key &#39;sunset&#39;." in await second.text()
    keys = await (await gateway.get("/keys")).text()
    assert 'href="/show?key=sunset"' in keys
    assert "image/png" in keys
    assert "32 \u00d7 24" in keys  # width x height


async def test_a_bad_file_shows_an_error_and_stores_nothing(gateway: Client) -> None:
    response = await gateway.post("/", data=form("notes", b"%PDF-1.4 not an image", "notes.jpeg"))
    assert response.status == 400
    html = await response.text()
    assert "Nothing was stored: the file is not a PNG, JPEG or GIF image." in html
    assert "No images yet" in await (await gateway.get("/keys")).text()


async def test_a_bad_key_shows_the_key_rule(gateway: Client) -> None:
    response = await gateway.post("/", data=form("no spaces please", JPEG))
    assert response.status == 400
    assert "letters, digits" in await response.text()


async def test_show_says_clearly_when_a_key_has_no_image(gateway: Client) -> None:
    response = await gateway.get("/show?key=ghost")
    assert response.status == 404
    assert "No image for key &#39;ghost&#39;." in await response.text()


async def test_a_forged_flash_cookie_is_ignored(gateway: Client) -> None:
    gateway.session.cookie_jar.update_cookies({"imagecache_flash": "eyJ4IjoxfQ.forged"})
    response = await gateway.get("/")
    assert response.status == 200
    assert 'class="flash' not in await response.text()
