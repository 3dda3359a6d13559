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
  src/uvloop_abi stands in for the libuv headers those files name.
"""
import importlib.metadata
import importlib.util
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# The directory holding the uvloop package, so `cimport uvloop.loop` finds
# its .pxd files (found without importing it).
UVLOOP_PARENT = os.path.dirname(
    importlib.util.find_spec("uvloop").submodule_search_locations[0])
UVLOOP_VERSION = importlib.metadata.version("uvloop")

extensions = [
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
    Extension(
        "pyworker.adoption",
        ["src/pyworker/adoption.pyx"],
        include_dirs=["src/uvloop_abi"],
        define_macros=[("CYDISPATCH_UVLOOP_VERSION", f'"{UVLOOP_VERSION}"')],
        extra_compile_args=["-O2"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src", UVLOOP_PARENT],
        compiler_directives={"language_level": "3"},
    )
)
