#!/usr/bin/env bash
# Builds the Python wheel (py/, maturin) and runs its tests in a fresh
# virtualenv, as a user's `pip install` would see it. Set CKPTVC_TEST_TORCH=1
# to also install torch (CPU) into the virtualenv for the torch tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(./scripts/setup.sh)}"
python3 -m pip install --quiet "maturin==1.16.0"
wheels="$(mktemp -d -t ckptvc-wheels.XXXXXX)"
venv="$(mktemp -d -t ckptvc-venv.XXXXXX)"
trap 'rm -rf "$wheels" "$venv"' EXIT
(cd py && python3 -m maturin build --release --quiet --out "$wheels")
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "$wheels"/ckptvc-*.whl pytest
if [ "${CKPTVC_TEST_TORCH:-0}" = 1 ]; then
    "$venv/bin/pip" install --quiet torch
fi
# Run from the tests' folder so that the installed package, not py/python,
# is what `import ckptvc` finds.
(cd py/tests && "$venv/bin/python" -m pytest -q -rs .)
