#!/usr/bin/env bash
# Sandbox start-to-exit latency, in one run on one machine: `granary sandbox --root rootfs
# --as-root -- /bin/true` against the baseline `unshare -m -p -f chroot DIR /bin/true` on a
# plain directory holding the same tree. Also shown: the same namespace + tmpfs + overlayfs
# set-up done by hand in shell on the plain directory (what granary adds beyond that is FUSE
# and its own processes).
#
# granary is measured four ways:
#   cold   - no FUSE view running: every sandbox starts (and stops) the shared FUSE server
#   warm   - one job after another: the server stays warm between them (--keep-warm)
#   shared - a long-running sandbox holds the shared server, so each new one joins it
#   mount  - a `granary mount --root rootfs` is running and is reused
# and with 8 sandboxes started at once (wall time of the batch of 8, shared server warm vs
# 8 baseline unshares at once).
#
# Prints medians of RUNS runs (BATCHES batches for the parallel case) and ratios to the
# baseline. Needs root and a static busybox (apt-get install busybox-static).
#
# Then (JOBS=1, the default; skipped with a message where the host lacks gcc, make or
# /usr/bin/python3) real CI jobs in a Debian-like root filesystem built from the host's /usr:
# gcc hello world, a Python import line, `make -j2` of 50 C files, and /bin/true, each in its
# own `granary sandbox` against the same command in `chroot` of a plain copy (with the same
# /proc, /dev, tmpfs /tmp and job bind). Medians of JOB_RUNS (default 5): chroot, granary
# cold (no server running: --keep-warm 0) and granary warm (sequential jobs, server kept warm).
#
# Usage: benches/sandbox.sh   Env: RUNS (default 40), BATCHES (default 10), GRANARY (binary;
#        default target/release/granary, built if missing), WORK (default /tmp/granary-bench/sandbox),
#        JOBS (default 1), JOB_RUNS (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-40}
batches=${BATCHES:-10}
work=${WORK:-/tmp/granary-bench/sandbox}
bb=/bin/busybox
[[ -x $bb ]] || { echo "sandbox.sh: $bb missing (apt-get install busybox-static)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "sandbox.sh: needs root" >&2; exit 1; }

bin=${GRANARY:-target/release/granary}
if [[ ! -x $bin ]]; then
  cargo build --release --quiet
fi
bin=$(realpath "$bin")

cleanup() {
  [[ -n ${holder:-} ]] && kill "$holder" 2>/dev/null || true
  [[ -n ${mounter:-} ]] && kill "$mounter" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

# KEEP=1 keeps the host root filesystem (and the store holding it) from an earlier run.
if [[ ${KEEP:-0} == 1 ]]; then
  rm -rf "$work/rootfs" "$work/mnt" "$work/scratch" "$work/rt"
else
  rm -rf "$work"
fi
mkdir -p "$work/rootfs"/{bin,etc,proc,dev,tmp,root,usr/bin} "$work/mnt" "$work/scratch"
cp "$bb" "$work/rootfs/bin/busybox"
for a in $("$bb" --list); do [[ $a == busybox ]] || ln -s busybox "$work/rootfs/bin/$a"; done
echo "root:x:0:0:root:/root:/bin/sh" >"$work/rootfs/etc/passwd"
export GRANARY_STORE=file://$work/store GRANARY_RUNTIME_DIR=$work/rt
"$bin" import "$work/rootfs" --name rootfs >/dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Runs "$@" RUNS times; prints the median wall time in milliseconds.
time_runs() {
  local i t0 t1
  for ((i = 0; i < runs; i++)); do
    t0=$EPOCHREALTIME
    "$@" >/dev/null
    t1=$EPOCHREALTIME
    echo "($t1 - $t0) * 1000" | bc -l
  done | median
}
# Runs 8 copies of "$@" at once, BATCHES times; prints the median batch wall time in ms.
time_batches() {
  local i j t0 t1 pids
  for ((i = 0; i < batches; i++)); do
    pids=()
    t0=$EPOCHREALTIME
    for ((j = 0; j < 8; j++)); do
      "$@" >/dev/null &
      pids+=($!)
    done
    wait "${pids[@]}"
    t1=$EPOCHREALTIME
    echo "($t1 - $t0) * 1000" | bc -l
  done | median
}

plain=$work/rootfs
baseline() { unshare -m -p -f chroot "$plain" /bin/true; }
by_hand() {
  unshare -m -p -f sh -c '
    mount --make-rprivate / && mount -t tmpfs t "$1" && mkdir "$1/u" "$1/w" "$1/m" &&
    mount -t overlay o -o "lowerdir=$2,upperdir=$1/u,workdir=$1/w" "$1/m" &&
    mount -t proc proc "$1/m/proc" && chroot "$1/m" /bin/true' sh "$work/scratch" "$plain"
}
sandbox() { "$bin" sandbox --root rootfs --as-root "$@" -- /bin/true; }

echo "sandbox.sh: $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), runs=$runs batches=$batches"
base=$(time_runs baseline)
hand=$(time_runs by_hand)
cold=$(time_runs sandbox --no-reuse --keep-warm 0)
sandbox --no-reuse --keep-warm 60s >/dev/null
warm=$(time_runs sandbox --no-reuse --keep-warm 60s)
pkill -TERM -f "__sandbox-serve.*$work" 2>/dev/null || true
sleep 0.5
"$bin" sandbox --root rootfs --as-root --no-reuse -- /bin/sleep 100000 &
holder=$!
sleep 1
shared=$(time_runs sandbox --no-reuse)
base8=$(time_batches baseline)
shared8=$(time_batches sandbox --no-reuse)
kill "$holder"; wait "$holder" 2>/dev/null || true; holder=
"$bin" mount "$work/mnt" --root rootfs 2>/dev/null &
mounter=$!
for _ in $(seq 100); do [[ -n $(ls "$work/rt/mounts" 2>/dev/null) ]] && break; sleep 0.05; done
mount=$(time_runs sandbox)
kill "$mounter"; wait "$mounter" 2>/dev/null || true; mounter=

row() { printf '%-58s %9.1f ms  %6.2fx\n' "$1" "$2" "$(echo "$2 / $3" | bc -l)"; }
echo "median start-to-exit of /bin/true (ratio to baseline):"
row "baseline: unshare -m -p -f chroot DIR /bin/true" "$base" "$base"
row "by hand: unshare + tmpfs + overlayfs + proc + chroot" "$hand" "$base"
row "granary sandbox, cold (starts the FUSE server)" "$cold" "$base"
row "granary sandbox, warm (the last job's server kept warm)" "$warm" "$base"
row "granary sandbox, joining a running shared server" "$shared" "$base"
row "granary sandbox, reusing a granary mount" "$mount" "$base"
echo "8 at once, median wall time of the batch (ratio to 8 baselines at once):"
row "baseline x8" "$base8" "$base8"
row "granary sandbox x8 (shared server warm)" "$shared8" "$base8"

[[ ${JOBS:-1} == 1 ]] || exit 0
if ! command -v gcc >/dev/null || ! command -v make >/dev/null || [[ ! -x /usr/bin/python3 ]]; then
  echo "sandbox.sh: skipping the CI jobs: the host lacks gcc, make or /usr/bin/python3"
  exit 0
fi
job_runs=${JOB_RUNS:-5}
host=$work/host-rootfs
job=$work/job
if [[ ! -d $host/usr ]]; then
  echo "building a root filesystem from the host's /usr ($(du -sh /usr | cut -f1)) ..."
  mkdir -p "$host"/{proc,dev,tmp,root,job,etc}
  cp -a /usr "$host/"
  for l in bin lib lib64 sbin; do [[ -L /$l ]] && ln -s "$(readlink /$l)" "$host/$l"; done
  cp -a /etc/. "$host/etc/" 2>/dev/null || true
fi
rm -rf "$job"
mkdir -p "$job/proj"
printf '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n' >"$job/hello.c"
for i in $(seq 50); do
  printf '#include <stdio.h>\n#include <string.h>\n#include <stdlib.h>\nint f%d(int x) { char b[64]; snprintf(b, sizeof b, "%%d", x); return (int)strlen(b) + atoi(b); }\n' "$i" >"$job/proj/f$i.c"
done
printf 'int main(void) { return 0; }\n' >"$job/proj/main.c"
printf 'SRC := $(wildcard *.c)\nprog: $(SRC:.c=.o)\n\t$(CC) -o $@ $^\n%%.o: %%.c\n\t$(CC) -O2 -c -o $@ $<\n' >"$job/proj/Makefile"
t0=$EPOCHREALTIME
"$bin" import "$host" --name host >/dev/null
echo "import of the root filesystem: $(echo "$EPOCHREALTIME - $t0" | bc -l | cut -c1-6) s"

jobs=(
  "gcc hello world|cd /tmp && gcc -o hello /job/hello.c && ./hello"
  "python3 import line|/usr/bin/python3 -c 'import json, sqlite3, ssl, email.mime.text, http.client, asyncio'"
  "make -j2, 50 C files|cp -r /job/proj /tmp/p && make -s -j2 -C /tmp/p"
  "/bin/true|/bin/true"
)
in_chroot() {
  unshare -m -p -f sh -c '
    mount --make-rprivate / && mount -t tmpfs t "$1/tmp" && mount --bind "$2" "$1/job" &&
    mount --rbind /dev "$1/dev" && mount -t proc proc "$1/proc" && exec chroot "$1" /bin/sh -c "$3"' \
    sh "$host" "$job" "$1"
}
in_sandbox() { "$bin" sandbox --root host --as-root --bind "$job:/job" --keep-warm "$1" -- /bin/sh -c "$2"; }
stop_servers() {
  pkill -TERM -f "__sandbox-serve.*$work" 2>/dev/null || true
  for _ in $(seq 100); do pgrep -f "__sandbox-serve.*$work" >/dev/null || break; sleep 0.05; done
}
echo "CI jobs, each in its own sandbox / chroot: median of $job_runs (ratio to chroot of a plain copy):"
printf '%-24s %10s %18s %18s\n' job chroot "granary cold" "granary warm"
for j in "${jobs[@]}"; do
  name=${j%%|*} cmd=${j#*|}
  in_chroot "$cmd" >/dev/null  # page cache of the copy warm, like the store's
  c=$(runs=$job_runs time_runs in_chroot "$cmd")
  cold=$(for ((r = 0; r < job_runs; r++)); do stop_servers; runs=1 time_runs in_sandbox 0 "$cmd"; done | median)
  in_sandbox 60s "$cmd" >/dev/null
  warm=$(runs=$job_runs time_runs in_sandbox 60s "$cmd")
  printf '%-24s %8.1f ms %9.1f ms %5.2fx %9.1f ms %5.2fx\n' "$name" "$c" "$cold" "$(echo "$cold / $c" | bc -l)" "$warm" "$(echo "$warm / $c" | bc -l)"
done
stop_servers
