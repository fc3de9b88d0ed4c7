"""The dispatcher registry: name -> Dispatcher subclass (the registered fn is the class itself).

A registered class also answers supports(world_size, device_type) -> (ok, reason): the tests run every
path on every world size and device it supports.
"""

from moekit.registry import Registry

DISPATCHERS = Registry("dispatcher")
