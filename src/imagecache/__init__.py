"""imagecache: an image store with an elastic in-memory cache tier.

This package is the user-facing gateway (web pages and JSON API). It imports
the cache node's client (cachenode) and nothing of the manager; the
``imagecache`` command that starts every part is the launcher package's.
"""

__version__ = "0.1.0"
