"""Builds cellserve's native kernel core (src/cellserve/kernels/native) with the system's C++ compiler.

The ISA-specific translation units get their own instruction-set flags; the module picks among them at
run time, so one build runs on any x86-64 CPU. Everything else (metadata, dependencies) is in
pyproject.toml."""

import platform
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "src/cellserve/kernels/native"
COMMON = ["-O3", "-std=c++17", "-fno-exceptions", "-fno-rtti", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_UNITS = {  # translation unit -> flags; selected at run time by CPU features
    f"{NATIVE}/isa_avx2.cpp": ["-mavx2", "-mfma"],
    f"{NATIVE}/isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma"],
} if X86 else {}
MISSING_COMPILER = ("cellserve builds its native kernels with a C++17 compiler, and the build failed here ({}). "
                    "Install one: Debian/Ubuntu 'apt-get install g++', Fedora 'dnf install gcc-c++', macOS "
                    "'xcode-select --install'.")


GRPC_FRONT = "src/cellserve/server/native/grpc_front.cpp"


def grpc_front_extension():
    """The native gRPC front end, where the distribution's grpc++ is installed (pkg-config finds it);
    without it cellserve serves gRPC through its Python front end, and says so here and at startup."""
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        print("cellserve: grpc++ not found (Debian/Ubuntu: apt-get install libgrpc++-dev); building without the "
              "native gRPC front end: gRPC is served by the Python front end", file=sys.stderr)
        return []
    return [Extension(
        "cellserve.server.native._grpc_front", sources=[GRPC_FRONT],
        extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden", "-Wall",
                            *(f for f in flags if not f.startswith(("-l", "-L")))],
        extra_link_args=[f for f in flags if f.startswith(("-l", "-L"))],
        language="c++",
    )]


class BuildNative(build_ext):
    def build_extension(self, ext):
        compiler = self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None) else None
        if compiler and shutil.which(compiler) is None:
            sys.exit(MISSING_COMPILER.format(f"'{compiler}' not found"))
        try:
            for source, flags in (ISA_UNITS.items() if ext.name.endswith("_native") else ()):
                ext.extra_objects += self.compiler.compile([source], output_dir=self.build_temp,
                                                           include_dirs=[NATIVE], extra_postargs=COMMON + flags)
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, a missing executable or compiler part (cc1plus)
            sys.exit(MISSING_COMPILER.format(f"the compiler's own messages are above; {exc}"))


setup(
    ext_modules=[Extension(
        "cellserve.kernels._native",
        sources=[f"{NATIVE}/{name}.cpp" for name in ("bindings", "packing", "drivers", "platform", "pool", "isa_portable")],
        depends=[f"{NATIVE}/native.h", f"{NATIVE}/kernels.inc", *ISA_UNITS],
        include_dirs=[NATIVE],
        extra_compile_args=COMMON,
        language="c++",
    ), Extension(  # the engine's step loop: calls the kernel core through its C face (kernels/native/api.h)
        "cellserve.engine._steploop",
        sources=["src/cellserve/engine/native/steploop.cpp"],
        depends=[f"{NATIVE}/api.h", f"{NATIVE}/native.h"],
        include_dirs=[NATIVE],
        extra_compile_args=COMMON,
        language="c++",
    ), *grpc_front_extension()],
    cmdclass={"build_ext": BuildNative},
)
