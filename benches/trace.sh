#!/usr/bin/env bash
# Cold start over the network with and without a trace (issue 20): real CI jobs — a Python
# line importing 14 stdlib modules, gcc compiling hello world — each in a `granary sandbox`
# of a root filesystem (the host's /usr/bin, /usr/sbin, /usr/libexec, /usr/include and the
# toolchain and runtime parts of /usr/lib: about 1.1 GB) stored on
#   s3://      moto_server on loopback, through benches/latency_proxy.py (DELAY_MS each way)
#   grpc+tcp:// a granary daemon on loopback, through the same kind of proxy
# Three ways each, medians of RUNS:
#   cold      fresh FUSE server, empty cache, no trace (--no-trace --keep-warm 0)
#   trace     fresh FUSE server, empty cache, replaying the job's trace (--trace JOB)
#   warm      the server kept warm by an earlier run of the same job (--keep-warm 60s)
# The trace is recorded once per job and backend by `sandbox --record-trace` (a cold run) and
# saved with `granary trace save`. Also shown: what the replay fetched and what the job used
# (the server's user.granary.trace, read inside the last traced run) and the S3 GETs.
#
# Usage: benches/trace.sh   Env: RUNS (default 5), DELAY_MS (default 10: 20 ms round trips),
#        GRANARY (binary; default target/release/granary), WORK (default
#        /tmp/granary-bench/trace), KEEP=1 keeps the root filesystem and stores of a run.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
delay=${DELAY_MS:-10}
work=${WORK:-/tmp/granary-bench/trace}
[[ $(id -u) == 0 ]] || { echo "trace.sh: needs root (sandboxes)" >&2; exit 1; }
command -v moto_server >/dev/null || { echo "trace.sh: moto_server missing (pip install 'moto[server]')" >&2; exit 1; }
[[ -x /usr/bin/python3 ]] && command -v gcc >/dev/null || { echo "trace.sh: needs /usr/bin/python3 and gcc" >&2; exit 1; }
bin=${GRANARY:-target/release/granary}
[[ -x $bin ]] || cargo build --release --quiet
bin=$(realpath "$bin")

[[ ${KEEP:-0} == 1 ]] || rm -rf "$work"
mkdir -p "$work/rt" "$work/job"
export GRANARY_RUNTIME_DIR=$work/rt
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mport=$(freeport); mproxy=$(freeport); dport=$(freeport); dproxy=$(freeport)
pids=()
mpid=
stop_servers() {
  pkill -TERM -f "__sandbox-serve.*$work/rt" 2>/dev/null || true
  for _ in $(seq 200); do pgrep -f "__sandbox-serve.*$work/rt" >/dev/null || break; sleep 0.05; done
}
cleanup() {
  stop_servers
  [[ -n $mpid ]] && kill "$mpid" 2>/dev/null
  mountpoint -q "$work/mnt" 2>/dev/null && fusermount3 -uz "$work/mnt"
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  true
}
trap cleanup EXIT
trap "exit 130" INT TERM

rootfs=$work/rootfs
if [[ ! -d $rootfs/usr ]]; then
  mkdir -p "$rootfs"/{proc,dev,tmp,root,job,etc,usr/lib}
  cp -a /usr/bin /usr/sbin /usr/libexec /usr/include /usr/lib64 "$rootfs/usr/" 2>/dev/null || true
  for d in x86_64-linux-gnu python3 python3.11 gcc ssl bfd-plugins compat-ld cpp file os-release locale; do
    [[ -e /usr/lib/$d ]] && cp -a "/usr/lib/$d" "$rootfs/usr/lib/"
  done
  for l in bin lib lib64 sbin; do [[ -L /$l ]] && ln -s "$(readlink /$l)" "$rootfs/$l"; done
  cp -a /etc/. "$rootfs/etc/" 2>/dev/null || true
fi
printf '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n' >"$work/job/hello.c"

moto_server -H 127.0.0.1 -p "$mport" >"$work/moto.log" 2>&1 & pids+=($!)
python3 benches/latency_proxy.py "$mproxy" "$mport" "$delay" & pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$mport/" && break; sleep 0.2; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
s3url() { echo "s3://rootfs?endpoint=http://127.0.0.1:$1&region=us-east-1&allow_http=true&timeout=120s"; }
fileurl=file://$work/store
# moto keeps its buckets in memory: imported every run.
curl -s -X PUT "http://127.0.0.1:$mport/rootfs" >/dev/null
t0=$EPOCHREALTIME
"$bin" --store "$(s3url "$mport")" import --name rootfs "$rootfs" >/dev/null 2>&1
echo "import into s3:// (direct): $(echo "$EPOCHREALTIME - $t0" | bc -l | cut -c1-6) s, $(du -sh --apparent-size "$rootfs" | cut -f1)"
[[ -d $work/store ]] || "$bin" --store "$fileurl" import --name rootfs "$rootfs" >/dev/null 2>&1
"$bin" --store "$fileurl" daemon --listen "127.0.0.1:$dport" --allow-unauthenticated-tcp 2>"$work/daemon.log" & pids+=($!)
python3 benches/latency_proxy.py "$dproxy" "$dport" "$delay" & pids+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$dport) 2>/dev/null && break; sleep 0.1; done

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
# sandbox URL ARGS... -- CMD: runs CMD in the root filesystem; prints milliseconds.
sandbox_ms() {
  local url=$1; shift
  local t0=$EPOCHREALTIME
  "$bin" --store "$url" sandbox --root rootfs --as-root --bind "$work/job:/job" "$@" >/dev/null 2>>"$work/sandbox.log" \
    || { echo "trace.sh: sandbox failed, see $work/sandbox.log" >&2; exit 1; }
  echo "($EPOCHREALTIME - $t0) * 1000" | bc -l
}

declare -A jobs=(
  [python]="/usr/bin/python3 -c 'import json, sqlite3, ssl, email.mime.text, http.client, asyncio, decimal, csv, argparse, logging, unittest, xml.etree.ElementTree, urllib.request, zipfile'"
  [gcc]="cd /tmp && gcc -o hello /job/hello.c && ./hello"
)
echo "== cold start with traces: medians of $runs, round trip +$((2 * delay)) ms through the proxy; $(date -u +%FT%TZ)"
printf '%-9s %-7s %10s %10s %10s %8s %8s   %s\n' backend job "cold ms" "trace ms" "warm ms" "trace/w" "cold/w" "replay (prefetched / used by the job)"
for backend in s3 grpc; do
  case $backend in
    s3) url=$(s3url "$mproxy") ;;
    grpc) url="grpc+tcp://127.0.0.1:$dproxy" ;;
  esac
  for job in python gcc; do
    cmd=${jobs[$job]}
    stop_servers
    rm -f "$work/rec"
    sandbox_ms "$url" --no-trace --keep-warm 0 --record-trace "$work/rec" -- /bin/sh -c "$cmd" >/dev/null
    "$bin" --store "$url" trace save rootfs --name "$job" --replace "$work/rec" >/dev/null
    cold=$(for _ in $(seq "$runs"); do stop_servers; sandbox_ms "$url" --no-trace --keep-warm 0 -- /bin/sh -c "$cmd"; done | median)
    traced=$(for _ in $(seq "$runs"); do stop_servers; sandbox_ms "$url" --trace "$job" --keep-warm 0 -- /bin/sh -c "$cmd"; done | median)
    # What the replay did: one more traced cold start, as a plain mount and a chroot, whose
    # user.granary.trace is read after the job.
    mkdir -p "$work/mnt"
    "$bin" --store "$url" mount "$work/mnt" --root rootfs --trace "$job" 2>>"$work/mount.log" & mpid=$!
    for _ in $(seq 400); do mountpoint -q "$work/mnt" && break; sleep 0.02; done
    unshare -m -p -f sh -c 'mount --make-rprivate / && mount -t tmpfs t "$1/tmp" && mount --bind "$2" "$1/job" &&
      mount --rbind /dev "$1/dev" && mount -t proc proc "$1/proc" && exec chroot "$1" /bin/sh -c "$3"' \
      sh "$work/mnt" "$work/job" "$cmd" >/dev/null 2>&1 || true
    getfattr --only-values -n user.granary.trace "$work/mnt" >"$work/replay_${backend}_$job" 2>/dev/null || true
    kill -TERM "$mpid"; wait "$mpid" || true
    stop_servers
    sandbox_ms "$url" --no-trace --keep-warm 60s -- /bin/sh -c "$cmd" >/dev/null
    warm=$(for _ in $(seq "$runs"); do sandbox_ms "$url" --no-trace --keep-warm 60s -- /bin/sh -c "$cmd"; done | median)
    f() { grep -o "^$1 [0-9]*" "$work/replay_${backend}_$job" | cut -d' ' -f2 || true; }
    printf '%-9s %-7s %10.0f %10.0f %10.0f %8.2f %8.2f   %s\n' "$backend" "$job" "$cold" "$traced" "$warm" \
      "$(echo "$traced / $warm" | bc -l)" "$(echo "$cold / $warm" | bc -l)" \
      "$(f prefetched_bytes) B / $(f used_bytes) B, $(f batches) batches"
  done
done
stop_servers
exit 0
