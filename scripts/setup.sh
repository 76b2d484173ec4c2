#!/usr/bin/env bash
# Installs what building ckptvc needs on a fresh Debian machine that has only
# the Rust toolchain: clang and libclang (RocksDB is built from C++ source and
# its bindings are generated with bindgen), and for `stats --plot` fontconfig
# and freetype (plotters finds its font through them) and a font to draw with.
# Safe to run again.
set -euo pipefail

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
missing=()
for pkg in clang libclang-dev g++ pkg-config libfontconfig1-dev libfreetype-dev fonts-dejavu-core; do
    installed "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Builds live outside the clone, so repeated runs (and CI on this machine)
# reuse the ~12-minute RocksDB build.
echo "${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/ckptvc-target}"
