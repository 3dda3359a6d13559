"""Declares the one compiled module: the primary's accept loop and the fd handoff.

Everything else lives in pyproject.toml. The module is built from src/dispatch.pyx
into the package namespace as cydispatch._dispatch.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "cydispatch._dispatch",
        ["src/dispatch.pyx"],
        include_dirs=["src"],
        extra_compile_args=["-O2"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": "3"},
    )
)
