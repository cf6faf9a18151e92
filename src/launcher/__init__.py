"""The ``imagecache`` command: the composition root that starts every part.

It sits above the others: it imports the cache node (cachenode), the gateway
(imagecache) and the manager (manager), and none of them imports it.
``python -m launcher`` is the same command as the ``imagecache`` script.
"""
