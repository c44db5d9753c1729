"""The package version, in a module of its own: submodules read it from here, not from the package `__init__`
(which loads them lazily), so no submodule imports its own package and the import graph has no cycle."""

__version__ = "0.1.0"
