"""The one compiled part: qkern, the cpu backend's few-row kernels (edge_vl2/quant/kernels/qkern.c).

Everything else is in pyproject.toml. The library is plain C loaded with ctypes (no Python or torch headers), built
for any x86-64: its AVX2 / AVX-VNNI functions carry `target` attributes and are chosen at run time. A failed build
does not fail the install: the cpu backend then runs PyTorch's packed ops and says so once at load.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # a missing or old compiler: install without qkern
            print(f"edge-vl2: not building {ext.name} ({e}); the cpu backend will use PyTorch's packed ops",
                  file=sys.stderr)

    def get_export_symbols(self, ext):
        return []  # a ctypes library, not a Python module: nothing named PyInit_ to export


qkern = Extension("edge_vl2.quant.kernels._qkern", ["edge_vl2/quant/kernels/qkern.c"],
                  extra_compile_args=["-O3", "-fopenmp", "-std=gnu11"], extra_link_args=["-fopenmp"])

setup(ext_modules=[qkern], cmdclass={"build_ext": OptionalBuildExt})
