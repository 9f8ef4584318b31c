# Two commands matter: `make demo` and `make test`. Both build .venv from pinned dependencies and compile
# the native kernel core (src/cellserve/kernels/native) with the system's C++ compiler first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
NATIVE := $(VENV)/.native-built
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard src/cellserve/kernels/native/*) $(wildcard src/cellserve/engine/native/*) \
	$(wildcard src/cellserve/server/native/*.cpp) $(wildcard src/cellserve/server/native/*.h) $(wildcard src/cellserve/bench/native/*.cpp)
# The native gRPC front end builds on the distribution's grpc++, the native HTTP front end on Boost.Beast,
# RapidJSON and OpenSSL; installed here when missing and we are root (without them the build goes on, and
# gRPC and HTTP are served by the Python front ends).
GRPC_PACKAGES := libgrpc++-dev libprotobuf-dev protobuf-compiler pkg-config
HTTP_PACKAGES := libboost-dev rapidjson-dev libssl-dev

.PHONY: demo test test-slow test-browser test-sanitize triton-env bench native clean

$(DEPS): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	touch $(DEPS)

$(NATIVE): $(DEPS) $(NATIVE_SOURCES)
	@(pkg-config --exists grpc++ protobuf && command -v protoc) >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		! command -v apt-get >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(GRPC_PACKAGES)) || \
		echo "cellserve: could not install $(GRPC_PACKAGES): gRPC will be served by the Python front end"
	@(test -f /usr/include/boost/beast/http.hpp && test -f /usr/include/rapidjson/document.h && \
		pkg-config --exists openssl) >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(HTTP_PACKAGES)) || \
		echo "cellserve: could not install $(HTTP_PACKAGES): HTTP will be served by the Python front end (uvicorn)"
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(NATIVE)

native: $(NATIVE)

demo: $(NATIVE)
	$(BIN)/cellserve demo

test: $(NATIVE)
	$(BIN)/python -m pytest

test-slow: $(NATIVE)
	$(BIN)/python -m pytest -m slow

# The native code's tests (gRPC and HTTP front ends, load generator, step loop, kernels) with AddressSanitizer and
# UndefinedBehaviorSanitizer: the extensions are rebuilt in place with both, Python loads their runtimes first,
# and the normal build is put back afterwards, whatever the tests gave.
SANITIZE_TESTS ?= tests/test_grpc.py tests/test_stream_lanes.py tests/test_token_lanes.py tests/test_http_front.py tests/test_websocket.py tests/test_steploop.py tests/test_kernels.py tests/test_bf16.py tests/test_faults.py
SANITIZE_ENV := ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:verify_asan_link_order=0 UBSAN_OPTIONS=print_stacktrace=1 \
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)"
test-sanitize: $(NATIVE)
	CELLSERVE_SANITIZE=1 $(BIN)/python setup.py -q build_ext --inplace --force 2>&1 | grep -v "^WARNING" || true
	$(SANITIZE_ENV) $(BIN)/python -m pytest -p no:cacheprovider $(SANITIZE_TESTS); status=$$?; \
		$(BIN)/python setup.py -q build_ext --inplace --force >/dev/null 2>&1; exit $$status

# Triton Inference Server as the benches' peer (`bench streams --deployments triton`): the nvidia-pytriton
# wheel's tritonserver, in an environment of its own, since its Python backend answers empty tensors under
# numpy 2.
triton-env: .venv-triton/.installed
.venv-triton/.installed:
	$(PYTHON) -m venv .venv-triton
	.venv-triton/bin/pip install --quiet nvidia-pytriton==0.7.0 "numpy<2" onnxruntime==1.31.1
	touch $@

# The live page in headless Chromium (Debian's package; installed here when missing, which needs root).
test-browser: $(NATIVE)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(BIN)/python -m pytest -m browser

bench: $(NATIVE)
	$(BIN)/cellserve bench gemm --json results/gemm.json
	$(BIN)/cellserve bench cells --json results/cells.json

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/cellserve/kernels/_native*.so src/cellserve/engine/_steploop*.so src/cellserve/server/native/_grpc_front*.so
