"""Declares the compiled modules; everything else lives in pyproject.toml.

- cydispatch._dispatch, from src/dispatch.pyx: the primary's accept loop and
  both ends of the fd handoff.
- pyworker.asgi, from src/pyworker/asgi.py and the declarations in
  src/pyworker/asgi.pxd: a worker's HTTP connections and requests for ASGI
  apps, compiled because the interpreter's dispatch and attribute lookups
  were most of what a request cost there.  The .py stays plain Python.
- pyworker.adoption, from src/pyworker/adoption.pyx: a handed connection
  opened into uvloop the way uvloop's own accept opens one.  It cimports
  uvloop's .pxd files, so the build needs uvloop (pyproject.toml's
  build-system requires it) and records which version it was built against;
  src/uvloop_abi stands in for the libuv headers those files name.  It is
  optional: a uvloop whose declarations it cannot be compiled against leaves
  it out, with a warning, and workers take uvloop's public path instead
  (pyworker.worker.load_direct_adoption).
"""
import importlib.metadata
import importlib.util
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILER_DIRECTIVES = {"language_level": "3"}

extensions = cythonize(
    [
        Extension(
            "cydispatch._dispatch",
            ["src/dispatch.pyx"],
            include_dirs=["src"],
            extra_compile_args=["-O2"],
        ),
        Extension(
            "pyworker.asgi",
            ["src/pyworker/asgi.py"],
            extra_compile_args=["-O2"],
        ),
    ],
    include_path=["src"],
    compiler_directives=COMPILER_DIRECTIVES,
)


def uvloop_adoption() -> list[Extension]:
    """pyworker.adoption, cythonized against the uvloop here; none if that fails."""
    try:
        # The directory holding the uvloop package, so `cimport uvloop.loop`
        # finds its .pxd files (found without importing it).
        uvloop_parent = os.path.dirname(
            importlib.util.find_spec("uvloop").submodule_search_locations[0])
        version = importlib.metadata.version("uvloop")
        return cythonize(
            [Extension(
                "pyworker.adoption",
                ["src/pyworker/adoption.pyx"],
                include_dirs=["src/uvloop_abi"],
                define_macros=[("CYDISPATCH_UVLOOP_VERSION", f'"{version}"')],
                extra_compile_args=["-O2"],
                # A C compiler's error leaves it out too (build_ext says so).
                optional=True,
            )],
            include_path=[uvloop_parent],
            compiler_directives=COMPILER_DIRECTIVES,
        )
    except Exception as exc:
        print(f"warning: pyworker.adoption left out, handed connections will take "
              f"uvloop's public path: {exc}", file=sys.stderr)
        return []


setup(ext_modules=extensions + uvloop_adoption())
