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

# Where the machine's Python has torch (it is ~3 GB: not installed here),
# the torch and integration tests run too, in a second virtualenv that sees
# the machine's packages (transformers, accelerate and lightning added).
if python3 -c "import torch" 2>/dev/null; then
    sitevenv="$(mktemp -d -t ckptvc-venv-site.XXXXXX)"
    trap 'rm -rf "$wheels" "$venv" "$sitevenv"' EXIT
    python3 -m venv --system-site-packages "$sitevenv"
    "$sitevenv/bin/pip" install --quiet "$wheels"/ckptvc-*.whl pytest numpy
    # The Trainer and Lightning tests need their frameworks (small beside
    # torch): installed here, pinned, so CI runs them. CKPTVC_NO_INTEGRATIONS=1
    # skips the download (offline machines); the tests then print "skipped".
    if [ "${CKPTVC_NO_INTEGRATIONS:-0}" != 1 ]; then
        "$sitevenv/bin/pip" install --quiet -r scripts/integrations-requirements.txt
    fi
    (cd py/tests && "$sitevenv/bin/python" -m pytest -q -rs test_torch.py test_integrations.py)
fi
