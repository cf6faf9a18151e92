"""Configuration: loaded once at start-up into frozen dataclasses, then validated.

Sources, later ones winning: the defaults here (the embedded default), a TOML
file (``--config`` or ``IMAGECACHE_CONFIG``), and ``IMAGECACHE_*`` environment
variables. Secrets (a MySQL password, AWS credentials) belong in the
environment or the standard AWS credential chain, never in the file.
Tests build these objects directly.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cachenode.client import NodeAccess
from cachenode.routing import AddressError, parse_address

DEFAULT_DATA_DIR = Path("imagecache-data")
MIB = 1 << 20
# Pillow refuses images of more pixels than this in Image.open itself (twice
# its Image.MAX_IMAGE_PIXELS), so a higher gateway.max_image_pixels could not hold.
MAX_IMAGE_PIXELS_CEILING = 178_956_970
# gateway.max_image_pixels by default: at most about 200 MB of decoded pixels at once.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# The longest manager.node_ready_seconds: the gateway gives configure_cache
# 120 s in all, and the warming and a rollback come after the wait.
MAX_NODE_READY_SECONDS = 100.0


class ConfigError(ValueError):
    """The configuration is invalid; the message says which setting and why."""


@dataclass(frozen=True, slots=True)
class AwsConfig:
    region: str = "us-east-1"
    # Only for S3-compatible stores and tests (a moto server); None means AWS itself.
    endpoint_url: str | None = None


@dataclass(frozen=True, slots=True)
class BlobConfig:
    backend: str = "folder"  # "folder" or "s3"
    folder: Path = DEFAULT_DATA_DIR / "blobs"
    bucket: str = ""
    prefix: str = "images/"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    max_upload_bytes: int = 20 * MIB
    # Cache nodes as host:port, used until the manager publishes a membership.
    nodes: tuple[str, ...] = ("127.0.0.1:11311",)
    node_timeout: float = 0.5
    # Copies of hot images the gateway keeps as ready responses, served after
    # a version CHECK with their node (src/imagecache/fastpath.py); 0: none.
    kept_copies_mb: float = 64.0
    # How long a kept copy is served without asking its node again, under a
    # read lease the node grants (src/cachenode/readleases.py); an upload of a
    # key read that recently is acknowledged up to this much later. 0: ask
    # for every read. Nodes grant at most 500.
    read_lease_ms: int = 250
    manager_url: str = "http://127.0.0.1:5001"
    manager_token: str = ""  # shared secret, from IMAGECACHE_MANAGER_TOKEN
    secret_key: str = ""  # signs flash-message cookies; a random one when empty
    # When set (from IMAGECACHE_API_TOKEN), configure_cache and delete_all need
    # "Authorization: Bearer <token>"; empty keeps them open, as the API's contract has them.
    api_token: str = ""
    # Uploads of more pixels are refused before decoding: a small file can
    # decode to gigabytes (4 bytes a pixel). Also the budget of pixels one
    # gateway process decodes at once.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Cache hits answered by the fast path (src/imagecache/fastpath.py), outside
    # aiohttp's request machinery and middlewares; off: aiohttp answers every
    # request, a little slower.
    fast_path: bool = True
    # Gateway processes sharing the port (src/imagecache/workers.py); 0: the
    # command's default (`gateway`: 1, `up`: one per core, at most 4).
    workers: int = 0


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    host: str = "127.0.0.1"
    port: int = 5001
    password: str = ""  # from IMAGECACHE_MANAGER_PASSWORD; `up` makes one up when empty
    pool: str = "local"  # "local" (node processes) or "aws" (an EC2 Auto Scaling Group)
    first_port: int = 11311  # local nodes listen from here up
    asg_name: str = ""
    node_port: int = 11311  # the port cache nodes listen on in the Auto Scaling Group
    metrics: str = "sqlite"  # "sqlite" (the metadata database) or "cloudwatch"
    cloudwatch_namespace: str = "imagecache"
    collect_seconds: float = 5.0
    autoscale_seconds: float = 60.0
    settle_seconds: float = 120.0
    rate_window_seconds: float = 60.0  # "the last minute" of getRate and the autoscaler
    # The miss curve's windows, closed on wall-clock multiples of this (60: on
    # the minute, as the statistics' minutes) and saved for what-if.
    curve_window_seconds: float = 60.0
    # aws: how often the membership is compared with the group's InService
    # instances (joining new ones, dropping vanished ones).
    reconcile_seconds: float = 30.0
    # aws: how long a grow waits for new instances to answer before giving the
    # capacity back; below the 120 s the gateway gives configure_cache in all.
    node_ready_seconds: float = 90.0
    # Announcements of every resize (src/manager/notify.py): an SNS topic's ARN
    # (published to with the standard AWS credential chain) and an http(s) URL
    # that gets a JSON POST (Slack-compatible); empty: not announced there.
    sns_topic_arn: str = ""
    notify_webhook: str = ""
    # Tries per announcement and channel, waiting this long before the first
    # retry and twice as long before each next one (1, 2, 4 ... s).
    notify_tries: int = 8
    notify_retry_seconds: float = 1.0


@dataclass(frozen=True, slots=True)
class Config:
    data_dir: Path = DEFAULT_DATA_DIR
    # SQLAlchemy URL: sqlite+aiosqlite:///path or mysql+aiomysql://user:pass@host:port/db
    metadata_url: str = f"sqlite+aiosqlite:///{DEFAULT_DATA_DIR}/imagecache.db"
    blobs: BlobConfig = field(default_factory=BlobConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    # The cache nodes' token (docs/protocol.md, AUTH), from IMAGECACHE_NODE_TOKEN:
    # gateways and the manager send it, local nodes are started with it.
    node_token: str = ""
    # TLS to the nodes: the CA bundle that verifies them (turns TLS on for
    # gateways and the manager), and the certificate and key of local nodes.
    node_tls_ca: str = ""
    node_tls_cert: str = ""
    node_tls_key: str = ""

    def node_access(self) -> NodeAccess:
        """How gateways and the manager reach the cache nodes."""
        tls = ssl.create_default_context(cafile=self.node_tls_ca) if self.node_tls_ca else None
        return NodeAccess(self.node_token, tls)

    def node_environment(self) -> dict[str, str]:
        """The settings of the ``imagecache node`` processes this system starts."""
        return {
            "IMAGECACHE_NODE_TOKEN": self.node_token,
            "IMAGECACHE_NODE_TLS_CERT": self.node_tls_cert,
            "IMAGECACHE_NODE_TLS_KEY": self.node_tls_key,
        }

    def validate(self) -> Config:
        """Return self, or raise ConfigError naming the first bad setting."""
        if self.blobs.backend not in ("folder", "s3"):
            raise ConfigError(f"blobs.backend must be 'folder' or 's3', not {self.blobs.backend!r}")
        if self.blobs.backend == "s3" and not re.fullmatch(
            r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.blobs.bucket
        ):
            raise ConfigError(
                f"blobs.bucket must be a valid S3 bucket name, not {self.blobs.bucket!r}"
            )
        if not self.metadata_url.startswith(("sqlite+aiosqlite://", "mysql+aiomysql://")):
            raise ConfigError(
                "metadata_url must start with sqlite+aiosqlite:// or mysql+aiomysql://"
            )
        if not 0 < self.gateway.port < 65536:
            raise ConfigError(f"gateway.port must be a TCP port, not {self.gateway.port}")
        if self.gateway.max_upload_bytes < 1:
            raise ConfigError("gateway.max_upload_mb must be positive")
        if not 0 <= self.gateway.workers <= 256:
            raise ConfigError(
                f"gateway.workers must be 0 (the default) to 256, not {self.gateway.workers}"
            )
        if not 0 <= self.gateway.kept_copies_mb <= 1 << 20:
            raise ConfigError(
                f"gateway.kept_copies_mb must be 0 to 1048576, not {self.gateway.kept_copies_mb}"
            )
        if not 0 <= self.gateway.read_lease_ms <= 500:
            raise ConfigError(
                f"gateway.read_lease_ms must be 0 to 500, not {self.gateway.read_lease_ms}"
            )
        if not 0 < self.gateway.max_image_pixels <= MAX_IMAGE_PIXELS_CEILING:
            raise ConfigError(
                f"gateway.max_image_pixels must be 1 to {MAX_IMAGE_PIXELS_CEILING},"
                f" not {self.gateway.max_image_pixels}"
            )
        for node in self.gateway.nodes:
            try:
                parse_address(node)
            except AddressError as error:
                raise ConfigError(str(error)) from None
        if self.manager.pool not in ("local", "aws"):
            raise ConfigError(f"manager.pool must be 'local' or 'aws', not {self.manager.pool!r}")
        if self.manager.pool == "aws" and not self.manager.asg_name:
            raise ConfigError("manager.asg_name is required when manager.pool is 'aws'")
        if self.manager.pool == "aws" and len(self.node_token) < 16:
            raise ConfigError(
                "set IMAGECACHE_NODE_TOKEN (16 characters or more) when manager.pool is 'aws':"
                " cache nodes on a network must not take requests from anyone who reaches them"
            )
        if self.manager.metrics not in ("sqlite", "cloudwatch"):
            raise ConfigError(
                f"manager.metrics must be 'sqlite' or 'cloudwatch', not {self.manager.metrics!r}"
            )
        _validate_announcements(self.manager)
        if not 0 < self.manager.reconcile_seconds <= 3600:
            raise ConfigError(
                "manager.reconcile_seconds must be above 0 and at most 3600,"
                f" not {self.manager.reconcile_seconds:g}"
            )
        if not 0 < self.manager.node_ready_seconds <= MAX_NODE_READY_SECONDS:
            raise ConfigError(
                "manager.node_ready_seconds must be above 0 and at most"
                f" {MAX_NODE_READY_SECONDS:g}, not {self.manager.node_ready_seconds:g}"
            )
        window = self.manager.curve_window_seconds
        # A window that divides the minute never straddles two of the statistics' minutes.
        if not (0 < window <= 60 and abs(60 / window - round(60 / window)) < 1e-9):
            raise ConfigError(
                "manager.curve_window_seconds must divide 60 (60, 30, 10, 1, 0.5...),"
                f" not {window:g}"
            )
        return self


# arn:<partition>:sns:<region>:<account>:<topic name>
_SNS_TOPIC_ARN = re.compile(
    r"arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?"
)


def _validate_announcements(manager: ManagerConfig) -> None:
    """The settings of the resizes' announcements; raises ConfigError for a bad one."""
    if manager.sns_topic_arn and not _SNS_TOPIC_ARN.fullmatch(manager.sns_topic_arn):
        raise ConfigError(
            "manager.sns_topic_arn must be an SNS topic's ARN"
            f" (arn:aws:sns:<region>:<account>:<name>), not {manager.sns_topic_arn!r}"
        )
    if manager.notify_webhook:
        url = urlsplit(manager.notify_webhook)
        if url.scheme not in ("http", "https") or not url.hostname:
            # Not echoed: a webhook URL often carries its secret in the path.
            raise ConfigError(
                "manager.notify_webhook (IMAGECACHE_NOTIFY_WEBHOOK) must be an http:// or"
                " https:// URL with a host"
            )
    if not 1 <= manager.notify_tries <= 100:
        raise ConfigError(f"manager.notify_tries must be 1 to 100, not {manager.notify_tries}")
    if not 0 < manager.notify_retry_seconds <= 3600:
        raise ConfigError(
            "manager.notify_retry_seconds must be above 0 and at most 3600,"
            f" not {manager.notify_retry_seconds:g}"
        )


# Environment variables and the setting each one sets, with its parser.
_ENVIRONMENT: dict[str, tuple[str, str]] = {
    "IMAGECACHE_DATA_DIR": ("", "data_dir"),
    "IMAGECACHE_METADATA_URL": ("", "metadata_url"),
    "IMAGECACHE_NODE_TOKEN": ("", "node_token"),
    "IMAGECACHE_NODE_TLS_CA": ("", "node_tls_ca"),
    "IMAGECACHE_NODE_TLS_CERT": ("", "node_tls_cert"),
    "IMAGECACHE_NODE_TLS_KEY": ("", "node_tls_key"),
    "IMAGECACHE_BLOB_BACKEND": ("blobs", "backend"),
    "IMAGECACHE_BLOB_FOLDER": ("blobs", "folder"),
    "IMAGECACHE_S3_BUCKET": ("blobs", "bucket"),
    "IMAGECACHE_S3_PREFIX": ("blobs", "prefix"),
    "IMAGECACHE_AWS_REGION": ("aws", "region"),
    "IMAGECACHE_AWS_ENDPOINT_URL": ("aws", "endpoint_url"),
    "IMAGECACHE_GATEWAY_HOST": ("gateway", "host"),
    "IMAGECACHE_GATEWAY_PORT": ("gateway", "port"),
    "IMAGECACHE_GATEWAY_WORKERS": ("gateway", "workers"),
    "IMAGECACHE_MAX_UPLOAD_MB": ("gateway", "max_upload_mb"),
    "IMAGECACHE_NODES": ("gateway", "nodes"),
    "IMAGECACHE_NODE_TIMEOUT": ("gateway", "node_timeout"),
    "IMAGECACHE_KEPT_COPIES_MB": ("gateway", "kept_copies_mb"),
    "IMAGECACHE_READ_LEASE_MS": ("gateway", "read_lease_ms"),
    "IMAGECACHE_FAST_PATH": ("gateway", "fast_path"),
    "IMAGECACHE_MANAGER_URL": ("gateway", "manager_url"),
    "IMAGECACHE_MANAGER_TOKEN": ("gateway", "manager_token"),
    "IMAGECACHE_SECRET_KEY": ("gateway", "secret_key"),
    "IMAGECACHE_API_TOKEN": ("gateway", "api_token"),
    "IMAGECACHE_MAX_IMAGE_PIXELS": ("gateway", "max_image_pixels"),
    "IMAGECACHE_MANAGER_HOST": ("manager", "host"),
    "IMAGECACHE_MANAGER_PORT": ("manager", "port"),
    "IMAGECACHE_MANAGER_PASSWORD": ("manager", "password"),
    "IMAGECACHE_POOL": ("manager", "pool"),
    "IMAGECACHE_FIRST_NODE_PORT": ("manager", "first_port"),
    "IMAGECACHE_ASG_NAME": ("manager", "asg_name"),
    "IMAGECACHE_NODE_PORT": ("manager", "node_port"),
    "IMAGECACHE_METRICS": ("manager", "metrics"),
    "IMAGECACHE_CLOUDWATCH_NAMESPACE": ("manager", "cloudwatch_namespace"),
    "IMAGECACHE_SETTLE_SECONDS": ("manager", "settle_seconds"),
    "IMAGECACHE_CURVE_WINDOW_SECONDS": ("manager", "curve_window_seconds"),
    "IMAGECACHE_RECONCILE_SECONDS": ("manager", "reconcile_seconds"),
    "IMAGECACHE_NODE_READY_SECONDS": ("manager", "node_ready_seconds"),
    "IMAGECACHE_SNS_TOPIC_ARN": ("manager", "sns_topic_arn"),
    "IMAGECACHE_NOTIFY_WEBHOOK": ("manager", "notify_webhook"),
}


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The configuration from defaults, the TOML file and the environment, validated.

    Raises ConfigError for an unreadable file, an unknown setting or a bad value.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get("IMAGECACHE_CONFIG")
    sections: dict[str, dict[str, Any]] = {
        "": {},
        "blobs": {},
        "aws": {},
        "gateway": {},
        "manager": {},
    }
    if path:
        try:
            document = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read configuration file {path}: {error}") from error
        for name, value in document.items():
            if isinstance(value, dict):
                if name not in sections:
                    raise ConfigError(f"unknown configuration section [{name}]")
                sections[name].update(value)
            else:
                sections[""][name] = value
    for variable, (section, name) in _ENVIRONMENT.items():
        if variable in environ:
            sections[section][name] = environ[variable]
    return _build(sections).validate()


def _build(sections: dict[str, dict[str, Any]]) -> Config:
    top = dict(sections[""])
    data_dir = Path(top.pop("data_dir", DEFAULT_DATA_DIR))
    gateway = dict(sections["gateway"])
    if "max_upload_mb" in gateway:
        gateway["max_upload_bytes"] = int(float(gateway.pop("max_upload_mb")) * MIB)
    if isinstance(gateway.get("nodes"), str):
        gateway["nodes"] = tuple(n.strip() for n in gateway["nodes"].split(",") if n.strip())
    blobs = dict(sections["blobs"])
    blobs.setdefault("folder", data_dir / "blobs")
    top.setdefault("metadata_url", f"sqlite+aiosqlite:///{data_dir}/imagecache.db")
    return Config(
        data_dir=data_dir,
        blobs=_section(BlobConfig, blobs, "blobs"),
        aws=_section(AwsConfig, sections["aws"], "aws"),
        gateway=_section(GatewayConfig, gateway, "gateway"),
        manager=_section(ManagerConfig, sections["manager"], "manager"),
        **_fields_of(Config, top, ""),
    )


def _section(cls: type[Any], values: dict[str, Any], name: str) -> Any:
    return cls(**_fields_of(cls, values, name))


def _fields_of(cls: type[Any], values: dict[str, Any], section: str) -> dict[str, Any]:
    """Values converted to the types of ``cls``'s fields; unknown names are an error."""
    known = {f.name: f for f in fields(cls)}
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known or name in ("blobs", "aws", "gateway", "manager", "data_dir"):
            where = f"[{section}] " if section else ""
            raise ConfigError(f"unknown setting {where}{name}")
        default = getattr(cls(), name)
        converted[name] = _convert(value, default, f"{section}.{name}" if section else name)
    return converted


def _convert(value: Any, default: Any, name: str) -> Any:
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, Path):
            return Path(value)
        if isinstance(default, tuple):
            return tuple(str(v) for v in value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad value for {name}: {value!r}") from error
    return value if value is None else str(value)


def with_data_dir(config: Config, data_dir: Path) -> Config:
    """The embedded default rooted at ``data_dir`` (used by tests and ``up``)."""
    return replace(
        config,
        data_dir=data_dir,
        metadata_url=f"sqlite+aiosqlite:///{data_dir}/imagecache.db",
        blobs=replace(config.blobs, folder=data_dir / "blobs"),
    )
