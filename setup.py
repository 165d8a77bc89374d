"""Builds kernels/_read_cpu (memory_read's XLA:CPU kernels, kernels/read_cpu.cc) against the XLA
FFI headers in jaxlib; the rest of the package is pure Python, described in pyproject.toml."""
import importlib.util
import os

from setuptools import Extension, setup

jaxlib = importlib.util.find_spec("jaxlib")
if jaxlib is None:
  raise SystemExit("setup.py: jaxlib (a build requirement in pyproject.toml) is not installed")
headers = os.path.join(jaxlib.submodule_search_locations[0], "include")

setup(ext_modules=[Extension(
    "kernels._read_cpu", ["kernels/read_cpu.cc"], language="c++",
    # a plain shared library that read_cpu.py loads with ctypes: it defines no Python module
    extra_compile_args=["-O3", "-g0", "-std=c++17", "-isystem", headers])])
