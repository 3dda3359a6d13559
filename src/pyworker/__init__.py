"""cydispatch: one primary accepts connections and hands them to CPU-pinned workers.

The package is named for its workers; the command is `cydispatch`.
"""

__version__ = "0.1.0"
