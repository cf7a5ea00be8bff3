#!/usr/bin/env bash
# What the aarch64 checks (tests/test_arm.py, docs/arm.md) need on an x86-64 Debian/Ubuntu machine
# without ARM hardware, from Debian's packages and PyPI only, all under build/aarch64/ (git-ignored):
#
#   host packages (apt-get)  g++-aarch64-linux-gnu: the cross compiler of the C++ example
#   debs/ -> sysroot/        a Debian 12 arm64 userland unpacked with `dpkg -x` (libc, libstdc++,
#                            CPython 3.11, libpng/libjpeg/OpenSSL and their headers): one
#                            self-consistent root for the cross build (CMAKE_SYSROOT) and for
#                            qemu-user (-L). No multiarch install: `apt-get install foo:arm64`
#                            upgrades the amd64 twin of every package it touches.
#   qemu/qemu-aarch64        qemu-user 10.0.x from bookworm-backports (a static binary taken out
#                            of its .deb): Debian 12's own qemu 7.2 mis-executes the SME code
#                            paths that XNNPACK picks on `-cpu max` and segfaults in
#                            `import onnxruntime` (docs/arm.md says what was measured)
#   wheels/ -> site-packages/  PyPI's cp311 manylinux aarch64 wheels of numpy, onnxruntime, onnx, Pillow,
#                            tqdm (the versions of the host's venv, so both sides run the same code)
#   executorch/              the aarch64 executorch 1.5.1 wheel unpacked, for its C++ runtime
#                            libraries and CMake config (its Python side needs torch: not used)
#
# The Debian packages come through apt-get with a private configuration (its own lists, cache and
# an empty dpkg status under build/aarch64/apt): the machine's dpkg database and apt sources are
# not changed. The mirror is the one the machine's apt already uses for this release.
#
# Idempotent: each part has a stamp that records what it was built from; a rerun with everything
# in place does nothing (no network). As root it installs what is missing; otherwise, like
# install_cpp_deps.sh, it prints what is missing and exits 0. `--check`: only report (exit 1 when
# something is missing). `--print-dir`: print the folder and exit.
#
#   PYTHON=/path/to/python   the host interpreter whose pip downloads the wheels and whose package
#                            versions are mirrored (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ARM="$ROOT/build/aarch64"
if [ "${1:-}" = "--print-dir" ]; then echo "$ARM"; exit 0; fi
CHECK_ONLY=0
[ "${1:-}" = "--check" ] && CHECK_ONLY=1
missing=()
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

RELEASE=bookworm                  # the arm64 userland: Debian 12, like the machines this runs on
QEMU_SUITE=bookworm-backports     # qemu-user 10.0.x
QEMU_VERSION_PREFIX="1:10.0."
EXECUTORCH_VERSION=1.5.1
HOST_PACKAGES=(g++-aarch64-linux-gnu)
# the arm64 userland, closed over Depends by apt (minus what only a package manager or a shell needs)
SYSROOT_PACKAGES=(libc6 libstdc++6 python3.11-minimal libpython3.11-stdlib nlohmann-json3-dev
                  libpng16-16 libjpeg62-turbo libssl3
                  libc6-dev libstdc++-12-dev libpng-dev libjpeg62-turbo-dev libssl-dev zlib1g-dev)
SYSROOT_EXCLUDE='^(dpkg|install-info|tar|perl|perl-base|perl-modules-.*|libperl.*|mailcap|readline-common|libc-dev-bin|rpcsvc-proto|lib(a|hwa|l|t|ub)san[0-9]+)$'
PYTHON_PACKAGES=(numpy onnxruntime onnx pillow tqdm)  # onnx: reading ORT's optimized graph (the fusion check)
WHEEL_PLATFORM=(--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_26_aarch64
                --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
                --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none --only-binary=:all:)


# ---- what is missing ------------------------------------------------------------------------------
host_missing=()
for pkg in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || host_missing+=("$pkg")
done
[ ${#host_missing[@]} -eq 0 ] || missing+=("host packages: ${host_missing[*]}")

python_requirements() {  # one requirement a line: the host venv's versions where it has the package
    "$PYTHON" - "${PYTHON_PACKAGES[@]}" <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
}
REQUIREMENTS="$(python_requirements 2>/dev/null || printf '%s\n' "${PYTHON_PACKAGES[@]}")"

stamp_is() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
SYSROOT_WANT="$RELEASE ${SYSROOT_PACKAGES[*]}"
WHEELS_WANT="$REQUIREMENTS"
stamp_is "$ARM/sysroot/.stamp" "$SYSROOT_WANT" || missing+=("arm64 sysroot ($RELEASE)")
[ -x "$ARM/qemu/qemu-aarch64" ] && [ -f "$ARM/qemu/.stamp" ] || missing+=("qemu-user 10 ($QEMU_SUITE)")
# --check asks whether the checks can run (wheels of any version); installing also follows the
# host venv's versions when they change
if [ $CHECK_ONLY = 1 ]; then
    [ -f "$ARM/site-packages/.stamp" ] || missing+=("aarch64 wheels: $(echo $REQUIREMENTS)")
else
    stamp_is "$ARM/site-packages/.stamp" "$WHEELS_WANT" || missing+=("aarch64 wheels: $(echo $REQUIREMENTS)")
fi
stamp_is "$ARM/executorch/.stamp" "executorch==$EXECUTORCH_VERSION" || missing+=("aarch64 executorch==$EXECUTORCH_VERSION wheel")

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ $CHECK_ONLY = 1 ]; then
    printf 'missing for the aarch64 checks: %s\n' "${missing[@]}" >&2
    exit 1
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    printf 'note: the aarch64 checks (tests/test_arm.py) need: %s\n' "${missing[@]}" >&2
    echo "      run scripts/install_arm_deps.sh as root on Debian/Ubuntu (it installs into build/aarch64/)" >&2
    exit 0
fi

log() { echo "install_arm_deps: $*" >&2; }
fail() { log "warning: $*; the aarch64 checks will skip"; exit 0; }
mkdir -p "$ARM"

# ---- host packages --------------------------------------------------------------------------------
if [ ${#host_missing[@]} -gt 0 ]; then
    log "installing ${host_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${host_missing[@]}" >/dev/null; } \
        || fail "apt-get could not install ${host_missing[*]}"
fi

# ---- a private apt for arm64 .debs and the backports qemu ----------------------------------------
APT="$ARM/apt"
private_apt() { APT_CONFIG="$APT/apt.conf" "$@"; }
setup_private_apt() {
    [ -f "$APT/.updated" ] && return 0
    # the machine's own mirrors for this release (no host name is written here)
    local main security
    main="$(apt-cache policy | awk -v r="$RELEASE/main" '$3 == r {print $2; exit}')"
    security="$(apt-cache policy | awk -v r="$RELEASE-security/main" '$3 == r {print $2; exit}')"
    [ -n "$main" ] || fail "apt has no $RELEASE/main source on this machine (apt-get update first?)"
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/preferences.d"
    : >"$APT/status"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    {
        echo "deb [arch=arm64,amd64 signed-by=$keyring] $main $RELEASE main"
        echo "deb [arch=arm64,amd64 signed-by=$keyring] $main $RELEASE-updates main"
        [ -z "$security" ] || echo "deb [arch=arm64,amd64 signed-by=$keyring] $security $RELEASE-security main"
        echo "deb [arch=amd64 signed-by=$keyring] $main $QEMU_SUITE main"
    } >"$APT/sources.list"
    cat >"$APT/apt.conf" <<EOF
Dir::State "$APT";
Dir::State::Lists "$APT/lists";
Dir::State::status "$APT/status";
Dir::Cache "$APT/cache";
Dir::Etc::SourceList "$APT/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "/nonexistent";
Dir::Etc::PreferencesParts "$APT/preferences.d";
APT::Architecture "arm64";
APT::Architectures { "arm64"; "amd64"; };
Acquire::Languages "none";
APT::Sandbox::User "root";  // the downloads land in a folder of the project, not _apt's
EOF
    private_apt apt-get update -qq >"$APT/update.log" 2>&1 || { cat "$APT/update.log" >&2; fail "apt-get update (private, arm64) failed"; }
    touch "$APT/.updated"
}

# download into debs/ (the cache: a .deb already there is not fetched again)
download_debs() {  # names ...
    mkdir -p "$ARM/debs"
    local want=() name
    for name in "$@"; do
        compgen -G "$ARM/debs/$(echo "${name%%[:=]*}" | sed 's/+/\\+/g')_*.deb" >/dev/null || want+=("$name")
    done
    [ ${#want[@]} -eq 0 ] && return 0
    (cd "$ARM/debs" && private_apt apt-get download -qq "${want[@]}" >/dev/null) || fail "apt-get download ${want[*]} failed"
}

if ! stamp_is "$ARM/sysroot/.stamp" "$SYSROOT_WANT"; then
    setup_private_apt
    log "arm64 sysroot: resolving ${SYSROOT_PACKAGES[*]}"
    mapfile -t closure < <(private_apt apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "${SYSROOT_PACKAGES[@]/%/:arm64}" 2>/dev/null \
        | grep -v '^[ <]' | grep -v ':amd64$' | sed 's/:arm64$//' | sort -u | grep -Ev "$SYSROOT_EXCLUDE")
    [ ${#closure[@]} -gt 0 ] || fail "could not resolve the arm64 packages"
    # the candidate version of each, as arm64 (arch-all packages such as media-types too)
    download_debs "${closure[@]/%/:arm64}"
    rm -rf "$ARM/sysroot.tmp"
    mkdir -p "$ARM/sysroot.tmp"
    for name in "${closure[@]}"; do
        deb="$(ls -t "$ARM/debs/${name}"_*.deb | head -1)"
        dpkg-deb -x "$deb" "$ARM/sysroot.tmp"
    done
    # Debian 12 ships libraries in both /lib and /usr/lib; merge them like a merged-/usr system so that
    # the loader, CMake and the compiler each see one tree
    for dir in lib bin sbin; do
        if [ -d "$ARM/sysroot.tmp/$dir" ] && [ ! -L "$ARM/sysroot.tmp/$dir" ]; then
            mkdir -p "$ARM/sysroot.tmp/usr/$dir"
            cp -a "$ARM/sysroot.tmp/$dir/." "$ARM/sysroot.tmp/usr/$dir/"
            rm -rf "${ARM:?}/sysroot.tmp/$dir"
        fi
        ln -sfn "usr/$dir" "$ARM/sysroot.tmp/$dir"
    done
    # absolute symlinks inside the tree (libfoo.so -> /lib/aarch64-linux-gnu/libfoo.so.1) made relative,
    # so that the linker resolves them inside the sysroot, not on the host
    find "$ARM/sysroot.tmp" -type l -lname '/*' | while read -r link; do
        target="$(readlink "$link")"
        rel="$(realpath -m --relative-to="$(dirname "$link")" "$ARM/sysroot.tmp$target")"
        ln -sfn "$rel" "$link"
    done
    printf '%s\n' "${closure[@]}" >"$ARM/sysroot.tmp/.packages"
    echo "$SYSROOT_WANT" >"$ARM/sysroot.tmp/.stamp"
    rm -rf "$ARM/sysroot"
    mv "$ARM/sysroot.tmp" "$ARM/sysroot"
    log "arm64 sysroot: ${#closure[@]} packages in $ARM/sysroot"
fi

if ! { [ -x "$ARM/qemu/qemu-aarch64" ] && [ -f "$ARM/qemu/.stamp" ]; }; then
    setup_private_apt
    version="$(private_apt apt-cache madison qemu-user:amd64 | awk -v s="$QEMU_SUITE" -v p="$QEMU_VERSION_PREFIX" \
        'index($3, p) == 1 && $0 ~ s {print $3; exit}')"
    [ -n "$version" ] || fail "no qemu-user $QEMU_VERSION_PREFIX* in $QEMU_SUITE"
    download_debs "qemu-user:amd64=$version"
    deb="$(ls -t "$ARM/debs/"qemu-user_*.deb | head -1)"
    rm -rf "$ARM/qemu.tmp"
    mkdir -p "$ARM/qemu.tmp"
    # one file of the package: the static aarch64 user-mode emulator
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$ARM/qemu.tmp" ./usr/bin/qemu-aarch64
    mv "$ARM/qemu.tmp/usr/bin/qemu-aarch64" "$ARM/qemu.tmp/qemu-aarch64"
    rm -rf "$ARM/qemu.tmp/usr"
    "$ARM/qemu.tmp/qemu-aarch64" --version | head -1 >"$ARM/qemu.tmp/.stamp" || fail "the backports qemu-aarch64 does not run here"
    rm -rf "$ARM/qemu"
    mv "$ARM/qemu.tmp" "$ARM/qemu"
    log "$(cat "$ARM/qemu/.stamp") in $ARM/qemu"
fi

pip_download() {  # requirements ...
    "$PYTHON" -m pip download -q --disable-pip-version-check --dest "$ARM/wheels" "${WHEEL_PLATFORM[@]}" "$@"
}

if ! stamp_is "$ARM/site-packages/.stamp" "$WHEELS_WANT"; then
    mapfile -t reqs <<<"$REQUIREMENTS"
    log "aarch64 wheels: ${reqs[*]}"
    mkdir -p "$ARM/wheels"
    pip_download "${reqs[@]}" || fail "pip could not download the aarch64 wheels of ${reqs[*]}"
    rm -rf "$ARM/site-packages.tmp"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --find-links "$ARM/wheels" \
        --target "$ARM/site-packages.tmp" "${WHEEL_PLATFORM[@]}" "${reqs[@]}" || fail "pip could not unpack the aarch64 wheels"
    echo "$WHEELS_WANT" >"$ARM/site-packages.tmp/.stamp"
    rm -rf "$ARM/site-packages"
    mv "$ARM/site-packages.tmp" "$ARM/site-packages"
fi

if ! stamp_is "$ARM/executorch/.stamp" "executorch==$EXECUTORCH_VERSION"; then
    log "aarch64 executorch==$EXECUTORCH_VERSION (C++ runtime libraries and CMake config)"
    pip_download --no-deps "executorch==$EXECUTORCH_VERSION" || fail "pip could not download the aarch64 executorch wheel"
    wheel="$(ls "$ARM/wheels/"executorch-"$EXECUTORCH_VERSION"-*aarch64*.whl | head -1)"
    rm -rf "$ARM/executorch.tmp"
    "$PYTHON" -m zipfile -e "$wheel" "$ARM/executorch.tmp"
    [ -f "$ARM/executorch.tmp/executorch/share/cmake/executorch-config.cmake" ] || fail "$wheel has no CMake config"
    echo "executorch==$EXECUTORCH_VERSION" >"$ARM/executorch.tmp/.stamp"
    rm -rf "$ARM/executorch"
    mv "$ARM/executorch.tmp" "$ARM/executorch"
fi
log "ready in $ARM ($(du -sh "$ARM" | cut -f1))"
