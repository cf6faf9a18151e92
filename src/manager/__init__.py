"""The manager: the pool of cache nodes, its configuration, statistics and autoscaler."""
