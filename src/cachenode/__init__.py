"""imagecache's cache node: an in-memory item store served over TCP.

Speaks the project's binary protocol and a memcached text subset on one port.
Imports nothing from the gateway or the manager.
"""

__version__ = "0.1.0"
