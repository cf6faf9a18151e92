"""Typed keys of the manager's aiohttp application."""

from __future__ import annotations

from aiohttp import web

# The keys the gateway's application shares (imagecache.appbase opens those stores).
from imagecache.appbase import BLOBS as BLOBS
from imagecache.appbase import CATALOG as CATALOG
from imagecache.appbase import CONFIG as CONFIG
from imagecache.appbase import MEMBERSHIP_STORE as MEMBERSHIP_STORE
from manager.announcements import Announcements
from manager.auth import LoginThrottle, Password, Sessions
from manager.autoscaler import Autoscaler
from manager.backends.base import PoolBackend
from manager.collector import Collector
from manager.curve_records import CurveRecords
from manager.curves import MissCurves
from manager.metrics import MetricsStore
from manager.notify import Notifier
from manager.pool import PoolController
from manager.records import ManagerRecords

RECORDS = web.AppKey("records", ManagerRecords)
CURVE_RECORDS = web.AppKey("curve_records", CurveRecords)
ANNOUNCEMENTS = web.AppKey("announcements", Announcements)
NOTIFIER = web.AppKey("notifier", Notifier)
BACKEND = web.AppKey("backend", PoolBackend)
CONTROLLER = web.AppKey("controller", PoolController)
METRICS = web.AppKey("metrics", MetricsStore)
COLLECTOR = web.AppKey("collector", Collector)
AUTOSCALER = web.AppKey("autoscaler", Autoscaler)
CURVES = web.AppKey("curves", MissCurves)
PASSWORD = web.AppKey("password", Password)
SESSIONS = web.AppKey("sessions", Sessions)
LOGIN_THROTTLE = web.AppKey("login_throttle", LoginThrottle)
CSRF = web.RequestKey("csrf", str)  # the logged-in operator's form token
