"""Typed keys of the gateway's aiohttp application (no string keys)."""

from __future__ import annotations

from aiohttp import web

# The keys the manager's application shares (imagecache.appbase opens those stores).
from imagecache.appbase import BLOBS as BLOBS
from imagecache.appbase import CATALOG as CATALOG
from imagecache.appbase import CONFIG as CONFIG
from imagecache.appbase import MEMBERSHIP_STORE as MEMBERSHIP_STORE
from imagecache.cachepool import CachePool
from imagecache.fastpath import FastPathCounters
from imagecache.keptcopies import KeptCopies
from imagecache.keysamples import KeySampler
from imagecache.manager_link import ManagerLink
from imagecache.membership import MembershipFollower
from imagecache.service import ImageService

POOL = web.AppKey("pool", CachePool)
KEPT_COPIES = web.AppKey("kept_copies", KeptCopies)
KEY_SAMPLER = web.AppKey("key_sampler", KeySampler)
FAST_PATH_COUNTERS = web.AppKey("fast_path_counters", FastPathCounters)
SERVICE = web.AppKey("service", ImageService)
MANAGER = web.AppKey("manager", ManagerLink)
FLASH_SECRET = web.AppKey("flash_secret", bytes)
MEMBERSHIP = web.AppKey("membership", MembershipFollower)
