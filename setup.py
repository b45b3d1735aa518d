"""Build hook: `pip install .` / `pip install -e .` compile the LD_PRELOAD shim with gcc.

The shim is a plain shared library (not a Python extension): a placeholder Extension
makes setuptools run build_ext (in place for editable installs) and mark the wheel as
platform-specific; the command below compiles it with interpose/build.py's flags into
interpose/libgridckpt_interpose.so, and the agent's log-control library (logctl.c) beside it
into interpose/libgridckpt_logctl.so.  Metadata stays in pyproject.toml.
"""
import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_builder():
    spec = importlib.util.spec_from_file_location("_gridckpt_shim_build", ROOT / "interpose" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildShim(build_ext):
    """Compile interpose/shim.c into interpose/libgridckpt_interpose.so (and logctl.c beside it)."""

    def get_ext_filename(self, fullname: str) -> str:
        return str(Path(*fullname.split("."))) + ".so"

    def build_extension(self, ext: Extension) -> None:
        builder = _load_builder()
        out = Path(self.get_ext_fullpath(ext.name))
        builder.build_library(out, src_dir=ROOT / "interpose")


setup(
    ext_modules=[Extension("interpose.libgridckpt_interpose", sources=["interpose/shim.c"])],
    cmdclass={"build_ext": BuildShim},
)
