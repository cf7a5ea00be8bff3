#!/usr/bin/env bash
# System packages the C++ example (examples/executorch_cpp) builds against: CMake and a C++17
# compiler, nlohmann/json (manifest.json), libpng and libjpeg(-turbo) (the same decoders Pillow
# uses, so the app decodes images to the same pixels as the Python runtime) and OpenSSL's libcrypto
# (sha256 of the program against the manifest). ExecuTorch itself comes from the executorch pip
# package (headers, libraries and CMake config), never from a source build.
#
# Installs with apt-get when running as root on a Debian/Ubuntu machine (CI, containers) and only
# what is missing; anywhere else it prints what to install and exits 0, so `make install` never
# fails because of the optional C++ example. `--check` only reports what is missing (exit 1).
set -euo pipefail

PACKAGES=(cmake g++ make pkg-config nlohmann-json3-dev libpng-dev libjpeg-dev libssl-dev)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
else
    missing=("${PACKAGES[@]}")
fi

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "missing for the C++ example: ${missing[*]}" >&2
    exit 1
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing the C++ example's system packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
        echo "warning: apt-get could not install ${missing[*]}; the C++ example will not build" >&2
    fi
else
    echo "note: the C++ example (examples/executorch_cpp) needs: ${missing[*]}" >&2
    echo "      (Debian/Ubuntu: sudo apt-get install ${missing[*]}; macOS: brew install cmake nlohmann-json libpng jpeg-turbo openssl)" >&2
fi
