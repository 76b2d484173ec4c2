#!/usr/bin/env bash
# `show`'s update errors against bench/m_error_units.py on a run's checkout.
#
# Commits the checkpoints of RUN (a folder of step-NNNNNN checkpoints as
# bench/resume_regimes.py writes them) up to step POINT under each POLICY,
# prints what `show --json POINT` reports (m's error in m's units, and the
# error put into Adam's update: m's share, v's, both), then checks POINT out
# and prints bench/m_error_units.py's measurement from the files.
#
# Usage: bench/update_errors_check.sh RUN POINT POLICY...
#   CKPTVC: the binary (default: ckptvc on PATH); WORK: scratch folder
#   (default: a temporary one, removed after).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run=$1 point=$2
shift 2
bin=${CKPTVC:-ckptvc}
work=${WORK:-$(mktemp -d -t ckptvc-update-errors.XXXXXX)}
if [[ -z ${WORK:-} ]]; then trap 'rm -rf "$work"' EXIT; fi
for policy in "$@"; do
    store=$work/store-$policy
    rm -rf "$store" "$work/out-$policy"
    "$bin" --repo "$store" --quiet init --policy "$policy"
    for dir in "$run"/step-*; do
        step=$((10#${dir##*step-}))
        if ((step <= point)); then
            "$bin" --repo "$store" --quiet commit --step "$step" "$dir"
        fi
    done
    "$bin" --repo "$store" --json show "$point" >"$work/show-$policy.json"
    "$bin" --repo "$store" --quiet checkout "$point" --output "$work/out-$policy"
    echo "== $policy, step $point"
    python3 - "$work/show-$policy.json" <<'PY'
import json, sys
show = json.load(open(sys.argv[1]))
u = show["update_error"]
print(f"show: m error {show['error_m']:.3f} in m's units; update error from m {u['m']:.3f}, "
      f"from v {u['v']:.3f}, both {u['both']:.3f}")
PY
    python3 "$here/m_error_units.py" "$run/step-$(printf %06d "$point")" "$work/out-$policy" --top 3
done
