"""Declares the compiled modules; everything else lives in pyproject.toml.

- cydispatch._dispatch, from src/dispatch.pyx: the primary's accept loop and
  both ends of the fd handoff.
- pyworker.response_head: a worker's response heads (status line, headers,
  framing), compiled because they cost an eighth of a request in Python.
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
        "pyworker.response_head",
        ["src/pyworker/response_head.pyx"],
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
