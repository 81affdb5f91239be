"""`thrifty demo`: the shop window. See ``run`` for the phases."""

from thrifty.demo.run import DEFAULT_DATA, run_demo

__all__ = ["DEFAULT_DATA", "run_demo"]
