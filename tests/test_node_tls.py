"""TLS on node connections: a node with a certificate, and clients that verify it.

The certificate is made here, for 127.0.0.1, and is its own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cachenode.client import NodeAccess, NodeClient
from cachenode.errors import NodeError
from imagecache.appkeys import POOL
from imagecache.config import load_config, with_data_dir
from tests.conftest import DEAD_URL, NodeProcess, image_bytes, start_node_process
from tests.test_fastpath import exchange, get, noise_png, running

TOKEN = "a-token-for-the-tls-tests-0123456"


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


def make_certificate(folder: Path) -> Certificate:
    """A self-signed certificate for the address 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagecache test node")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Certificate(folder / "node-cert.pem", folder / "node-key.pem")
    paths.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path)


@pytest.fixture
def node(certificate: Certificate) -> Iterator[NodeProcess]:
    settings = {
        "IMAGECACHE_NODE_TLS_CERT": str(certificate.cert),
        "IMAGECACHE_NODE_TLS_KEY": str(certificate.key),
        "IMAGECACHE_NODE_TOKEN": TOKEN,
    }
    started = start_node_process("--capacity-mb", "64", settings=settings)
    yield started
    started.stop()


def verifying(certificate: Certificate) -> NodeAccess:
    return NodeAccess(TOKEN, ssl.create_default_context(cafile=str(certificate.cert)))


async def test_values_small_and_large_cross_tls_whole(
    node: NodeProcess, certificate: Certificate
) -> None:
    large = os.urandom(3 << 20)  # spans many reads: received in place, through TLS
    async with NodeClient(node.host, node.port, access=verifying(certificate)) as client:
        await client.set(b"small", b"v")
        await client.set(b"large", large)
        assert await client.get(b"small") == b"v"
        assert await client.get(b"large") == large
        assert await client.check(b"large") == 0


async def test_a_client_without_tls_or_that_cannot_verify_the_node_gets_nowhere(
    node: NodeProcess, tmp_path: Path
) -> None:
    async with NodeClient(node.host, node.port, access=NodeAccess(TOKEN)) as plain:
        with pytest.raises(NodeError):
            await plain.ping()
    (tmp_path / "other").mkdir()
    other = make_certificate(tmp_path / "other")  # another CA: the node's is unknown to it
    async with NodeClient(node.host, node.port, access=verifying(other)) as fooled:
        with pytest.raises(NodeError, match=r"CERTIFICATE_VERIFY_FAILED"):
            await fooled.ping()


async def test_a_gateway_configured_for_tls_serves_through_it(
    node: NodeProcess, certificate: Certificate, tmp_path: Path
) -> None:
    settings = {"IMAGECACHE_NODE_TLS_CA": str(certificate.cert), "IMAGECACHE_NODE_TOKEN": TOKEN}
    loaded = load_config(environ=settings)
    assert (loaded.node_tls_ca, loaded.node_token) == (str(certificate.cert), TOKEN)
    base = with_data_dir(loaded, tmp_path / "data")
    config = replace(
        base,
        gateway=replace(base.gateway, nodes=(f"{node.host}:{node.port}",), manager_url=DEAD_URL),
    )
    png, big = image_bytes("PNG", color="teal"), noise_png(300)
    async with running(config) as gateway:
        await gateway.upload("small", png)
        await gateway.upload("big", big)
        replies = await exchange(gateway.port, get("/image/small"), get("/image/big"))
        assert [reply.body for reply in replies] == [png, big]
        assert gateway.app[POOL].counters.errors == 0  # no node failure read around
    async with NodeClient(node.host, node.port, access=verifying(certificate)) as client:
        item = await client.get_item(b"big")
    assert item is not None
    assert item.value == big  # written through the gateway's TLS connection
