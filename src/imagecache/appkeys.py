"""Typed keys of the gateway's aiohttp application (no string keys)."""

from __future__ import annotations

from aiohttp import web

from imagecache.blobs import BlobStore
from imagecache.cachepool import CachePool
from imagecache.catalog import ImageCatalog
from imagecache.config import Config
from imagecache.fastpath import FastPathCounters
from imagecache.keptcopies import KeptCopies
from imagecache.keysamples import KeySampler
from imagecache.manager_link import ManagerLink
from imagecache.membership import MembershipFollower
from imagecache.poolmembers import MembershipStore
from imagecache.service import ImageService

CONFIG = web.AppKey("config", Config)
CATALOG = web.AppKey("catalog", ImageCatalog)
MEMBERSHIP_STORE = web.AppKey("membership_store", MembershipStore)
BLOBS = web.AppKey("blobs", BlobStore)
POOL = web.AppKey("pool", CachePool)
KEPT_COPIES = web.AppKey("kept_copies", KeptCopies)
KEY_SAMPLER = web.AppKey("key_sampler", KeySampler)
FAST_PATH_COUNTERS = web.AppKey("fast_path_counters", FastPathCounters)
SERVICE = web.AppKey("service", ImageService)
MANAGER = web.AppKey("manager", ManagerLink)
FLASH_SECRET = web.AppKey("flash_secret", bytes)
MEMBERSHIP = web.AppKey("membership", MembershipFollower)
