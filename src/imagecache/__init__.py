"""imagecache: an image store with an elastic in-memory cache tier.

This package is the user-facing gateway (web pages and JSON API) and the
``imagecache`` command line, the composition root that starts every part.
"""

__version__ = "0.1.0"
