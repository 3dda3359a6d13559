"""Declares the compiled modules; everything else lives in pyproject.toml.

- cydispatch._dispatch, from src/dispatch.pyx: the primary's accept loop and
  both ends of the fd handoff.
- pyworker.asgi, from src/pyworker/asgi.py and the declarations in
  src/pyworker/asgi.pxd: a worker's HTTP connections and requests for ASGI
  apps, compiled because the interpreter's dispatch and attribute lookups
  were most of what a request cost there.  The .py stays plain Python.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

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
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": "3"},
    )
)
