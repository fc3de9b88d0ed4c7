"""The dispatcher registry: name -> Dispatcher subclass (the registered fn is the class itself).

A registered class also answers supports_world_size(world_size) -> (ok, reason): the tests run every
path on every world size it supports.
"""

from moekit.registry import Registry

DISPATCHERS = Registry("dispatcher")
