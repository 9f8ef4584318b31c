"""Builds cellserve's native kernel core (src/cellserve/kernels/native) with the system's C++ compiler.

The ISA-specific translation units get their own instruction-set flags; the module picks among them at
run time, so one build runs on any x86-64 CPU. Everything else (metadata, dependencies) is in
pyproject.toml."""

import os
import platform
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "src/cellserve/kernels/native"
# `make test-sanitize` builds everything with AddressSanitizer and UndefinedBehaviorSanitizer
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"] \
    if os.environ.get("CELLSERVE_SANITIZE") else []
COMMON = ["-O3", "-std=c++17", "-fno-exceptions", "-fno-rtti", "-fvisibility=hidden", "-Wall", "-Wno-unused-function",
          *SANITIZE]
X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_UNITS = {  # translation unit -> flags; selected at run time by CPU features
    f"{NATIVE}/isa_avx2.cpp": ["-mavx2", "-mfma"],
    f"{NATIVE}/isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma"],
    f"{NATIVE}/isa_amx.cpp": ["-mamx-tile", "-mamx-bf16", "-mamx-int8", "-mavx512f", "-mavx512bw", "-mavx512vl",
                              "-mavx512vnni", "-mavx512bf16", "-mavx2", "-mfma"],
} if X86 else {}
MISSING_COMPILER = ("cellserve builds its native kernels with a C++17 compiler, and the build failed here ({}). "
                    "Install one: Debian/Ubuntu 'apt-get install g++', Fedora 'dnf install gcc-c++', macOS "
                    "'xcode-select --install'.")


GRPC_FRONT = "src/cellserve/server/native/grpc_front.cpp"
LANES = ["src/cellserve/server/native/lanes.cpp", "src/cellserve/server/native/token_lanes.cpp"]
LOOP_FACE = "src/cellserve/engine/native/loop_face.h"
FRONT_HEADER = "src/cellserve/server/native/front.h"
LANES_HEADER = "src/cellserve/server/native/lanes.h"
HTTP_FRONT = ["src/cellserve/server/native/http_front.cpp", "src/cellserve/server/native/websocket_front.cpp"]
HTTP_HEADERS = ["src/cellserve/server/native/http_front.h", "src/cellserve/server/native/token_lanes.h",
                "src/cellserve/server/native/websocket_front.h", "src/cellserve/server/native/stream_lanes.h"]
LOADGEN = "src/cellserve/bench/native/loadgen.cpp"
WSLOAD = "src/cellserve/bench/native/wsload.cpp"
PROTOCOL_FILES = ("model_config.proto", "grpc_service.proto")


def grpc_flags() -> list[str] | None:
    """Compiler and linker flags for grpc++ and protobuf (pkg-config), or None where they are missing."""
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return flags if shutil.which("protoc") else None


def http_flags() -> list[str] | None:
    """Flags for the native HTTP front end: Boost.Beast and RapidJSON (headers) and OpenSSL, or None where
    one is missing."""
    headers = ("boost/beast/http.hpp", "boost/asio/ssl.hpp", "rapidjson/document.h")
    roots = ("/usr/include", "/usr/local/include", "/opt/homebrew/include")
    if not all(any(os.path.exists(os.path.join(root, h)) for root in roots) for h in headers):
        return None
    try:
        return subprocess.run(["pkg-config", "--cflags", "--libs", "openssl"], capture_output=True, text=True,
                              check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None


def grpc_extensions():
    """The native gRPC front end and the benches' load generator, where the distribution's grpc++ and
    protoc are installed; without them cellserve serves gRPC through its Python front end, and says so here
    and at startup."""
    flags = grpc_flags()
    if flags is None:
        print("cellserve: grpc++ or protoc not found (Debian/Ubuntu: apt-get install libgrpc++-dev protobuf-compiler); "
              "building without the native gRPC front end: gRPC is served by the Python front end", file=sys.stderr)
        return []
    compile_flags = ["-O2", "-std=c++17", "-fvisibility=hidden", "-Wall", *SANITIZE,
                     *(f for f in flags if not f.startswith(("-l", "-L")))]
    link_flags = [*SANITIZE, *(f for f in flags if f.startswith(("-l", "-L")))]
    try:  # the protocol's messages come from tritonclient's descriptors (in .venv; not in an isolated build)
        import google.protobuf  # noqa: F401
        import tritonclient.grpc  # noqa: F401
        protocol = True
    except ImportError:
        protocol = False
        print("cellserve: tritonclient is not importable here (an isolated build): building the gRPC front end "
              "without its stream lanes, and without the benches' native load generator", file=sys.stderr)
    web = http_flags() if protocol else None
    if protocol and web is None:
        print("cellserve: Boost (Beast), RapidJSON or OpenSSL not found (Debian/Ubuntu: apt-get install libboost-dev "
              "rapidjson-dev libssl-dev); building without the native HTTP front end: HTTP is served by uvicorn",
              file=sys.stderr)
    web_sources, web_compile, web_link = (HTTP_FRONT, ["-DCELLSERVE_HTTP", *(f for f in web if not f.startswith(("-l", "-L")))],
                                          [f for f in web if f.startswith(("-l", "-L"))]) if web is not None else ([], [], [])
    front = Extension("cellserve.server.native._grpc_front",
                      sources=[GRPC_FRONT, *(LANES if protocol else []), *web_sources],
                      depends=[FRONT_HEADER, LANES_HEADER, LOOP_FACE, *HTTP_HEADERS],
                      include_dirs=[os.path.dirname(LOOP_FACE)],
                      extra_compile_args=compile_flags + (["-DCELLSERVE_LANES"] if protocol else []) + web_compile,
                      extra_link_args=link_flags + web_link, language="c++")
    front.protocol = protocol
    units = [front]
    if protocol:
        loadgen = Extension("cellserve.bench._loadgen", sources=[LOADGEN], extra_compile_args=compile_flags,
                            extra_link_args=link_flags, language="c++")
        units.append(loadgen)  # (it reads the protocol through tritonclient's descriptors at run time)
    if web is not None:  # the WebSocket load generator: Boost.Beast's headers only
        units.append(Extension("cellserve.bench._wsload", sources=[WSLOAD],
                               extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden", "-Wall", *SANITIZE],
                               extra_link_args=[*SANITIZE, "-lpthread"], language="c++"))
    return units


def generate_protocol(out_dir: str) -> list[str]:
    """The inference protocol's C++ messages, generated by protoc from the descriptors that tritonclient's
    generated Python modules carry (the wire has one source: the protocol's own definitions)."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    os.makedirs(out_dir, exist_ok=True)
    descriptors = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        module.DESCRIPTOR.CopyToProto(descriptors.file.add())
    descriptor_set = os.path.join(out_dir, "inference.protoset")
    with open(descriptor_set, "wb") as f:
        f.write(descriptors.SerializeToString())
    subprocess.run(["protoc", f"--descriptor_set_in={descriptor_set}", f"--cpp_out={out_dir}", *PROTOCOL_FILES],
                   check=True)
    return [os.path.join(out_dir, name.replace(".proto", ".pb.cc")) for name in PROTOCOL_FILES]


class BuildNative(build_ext):
    def build_extension(self, ext):
        compiler = self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None) else None
        if compiler and shutil.which(compiler) is None:
            sys.exit(MISSING_COMPILER.format(f"'{compiler}' not found"))
        try:
            for source, flags in (ISA_UNITS.items() if ext.name.endswith("_native") else ()):
                ext.extra_objects += self.compiler.compile([source], output_dir=self.build_temp,
                                                           include_dirs=[NATIVE], extra_postargs=COMMON + flags)
            if getattr(ext, "protocol", False):  # the front end's lanes and the load generator
                ext.extra_objects += self._protocol_objects(ext.extra_compile_args)
                ext.include_dirs.append(os.path.join(self.build_temp, "protocol"))
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, a missing executable or compiler part (cc1plus)
            sys.exit(MISSING_COMPILER.format(f"the compiler's own messages are above; {exc}"))

    def _protocol_objects(self, flags: list[str]) -> list[str]:
        """The protocol's generated messages, compiled once for every extension that links them."""
        if not hasattr(self, "_protocol"):
            out = os.path.join(self.build_temp, "protocol")
            self._protocol = self.compiler.compile(generate_protocol(out), output_dir=self.build_temp,
                                                   include_dirs=[out], extra_postargs=flags)
        return self._protocol


setup(
    ext_modules=[Extension(
        "cellserve.kernels._native",
        sources=[f"{NATIVE}/{name}.cpp" for name in ("bindings", "packing", "drivers", "platform", "pool", "isa_portable")],
        depends=[f"{NATIVE}/native.h", f"{NATIVE}/kernels.inc", *ISA_UNITS],
        include_dirs=[NATIVE],
        extra_compile_args=COMMON,
        extra_link_args=SANITIZE,
        language="c++",
    ), Extension(  # the engine's step loop: calls the kernel core through its C face (kernels/native/api.h)
        "cellserve.engine._steploop",
        sources=["src/cellserve/engine/native/steploop.cpp"],
        depends=[f"{NATIVE}/api.h", f"{NATIVE}/native.h", LOOP_FACE],
        include_dirs=[NATIVE],
        extra_compile_args=COMMON,
        extra_link_args=SANITIZE,
        language="c++",
    ), *grpc_extensions()],
    cmdclass={"build_ext": BuildNative},
)
