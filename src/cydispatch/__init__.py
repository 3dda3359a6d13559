"""cydispatch: one primary accepts connections and hands them to CPU-pinned workers.

This package is the product: the command line, the settings, the primary
(supervisor and the compiled accept loop, `cydispatch._dispatch`) and the
benchmark.  The worker process lives in `pyworker`.
"""

__version__ = "0.1.0"
