#!/usr/bin/env bash
# Build examples/executorch_cpp (crossvit_classify) with CMake against the installed executorch pip
# package: its headers, prebuilt libraries and CMake config. No ExecuTorch source build.
#
#   bash scripts/build_cpp_example.sh [BUILD_DIR]      (default: build/executorch_cpp)
#   bash scripts/build_cpp_example.sh --arch aarch64 [BUILD_DIR]
#                                                       cross-compile for 64-bit ARM Linux (default:
#                                                       build/executorch_cpp_aarch64) against the arm64
#                                                       root and aarch64 executorch wheel that
#                                                       scripts/install_arm_deps.sh unpacks into
#                                                       build/aarch64/; run it with qemu-aarch64 -L
#                                                       build/aarch64/sysroot (docs/arm.md)
#   PYTHON=/path/to/python                              the interpreter whose executorch to use
#                                                       (default: .venv/bin/python, else python3)
# Prints the path of the built program on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=host
if [ "${1:-}" = "--arch" ]; then
    ARCH="${2:-}"
    shift 2 || true
    [ "$ARCH" = "aarch64" ] || { echo "build_cpp_example: --arch: only aarch64 (or no --arch: this machine's)" >&2; exit 2; }
fi
if [ "$ARCH" = "aarch64" ]; then BUILD_DIR="${1:-build/executorch_cpp_aarch64}"; else BUILD_DIR="${1:-build/executorch_cpp}"; fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

bash scripts/install_cpp_deps.sh  # system packages (apt-get as root; otherwise says what is missing)
for tool in cmake c++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "build_cpp_example: $tool not found (scripts/install_cpp_deps.sh lists what to install)" >&2; exit 3; }
done
CMAKE_ARGS=()
if [ "$ARCH" = "aarch64" ]; then
    ARM_DIR="$(bash scripts/install_arm_deps.sh --print-dir)"
    PYTHON="$PYTHON" bash scripts/install_arm_deps.sh  # as root: installs what is missing (idempotent)
    bash scripts/install_arm_deps.sh --check || { echo "build_cpp_example: run scripts/install_arm_deps.sh as root first" >&2; exit 3; }
    ET_ROOT="$ARM_DIR/executorch/executorch"
    CMAKE_ARGS=(-DCMAKE_TOOLCHAIN_FILE="$PWD/examples/executorch_cpp/cmake/aarch64-linux-gnu.cmake" -DCROSSVIT_SYSROOT="$ARM_DIR/sysroot")
else
    # the package root, found without importing executorch (which would import torch)
    ET_ROOT="$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("executorch"); print(s.submodule_search_locations[0] if s else "")')"
    CMAKE_ARGS=(-DCMAKE_PREFIX_PATH="$ET_ROOT")
fi
if [ -z "$ET_ROOT" ] || [ ! -f "$ET_ROOT/share/cmake/executorch-config.cmake" ]; then
    echo "build_cpp_example: no executorch package with its CMake config for $PYTHON (pip install 'crossvit-edge[executorch]')" >&2
    exit 3
fi
mkdir -p "$(dirname "$BUILD_DIR")"
JOBS="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
cmake -S examples/executorch_cpp -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "${CMAKE_ARGS[@]}" \
      -Dexecutorch_DIR="$ET_ROOT/share/cmake" >"$BUILD_DIR.configure.log" 2>&1 \
    || { cat "$BUILD_DIR.configure.log" >&2; exit 1; }
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "$BUILD_DIR/crossvit_classify"
