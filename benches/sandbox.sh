#!/usr/bin/env bash
# Sandbox start-to-exit latency, in one run on one machine: `granary sandbox --root rootfs
# --as-root -- /bin/true` against the baseline `unshare -m -p -f chroot DIR /bin/true` on a
# plain directory holding the same tree. Also shown: the same namespace + tmpfs + overlayfs
# set-up done by hand in shell on the plain directory (what granary adds beyond that is FUSE
# and its own processes).
#
# granary is measured three ways:
#   cold   - no FUSE view running: every sandbox starts (and stops) the shared FUSE server
#   shared - a long-running sandbox holds the shared server, so each new one joins it
#   mount  - a `granary mount --root rootfs` is running and is reused
# and with 8 sandboxes started at once (wall time of the batch of 8, shared server warm vs
# 8 baseline unshares at once).
#
# Prints medians of RUNS runs (BATCHES batches for the parallel case) and ratios to the
# baseline. Needs root and a static busybox (apt-get install busybox-static).
#
# Usage: benches/sandbox.sh   Env: RUNS (default 40), BATCHES (default 10), GRANARY (binary;
#        default target/release/granary, built if missing), WORK (default /tmp/granary-bench/sandbox).
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

rm -rf "$work"
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
cold=$(time_runs sandbox --no-reuse)
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
row "granary sandbox, joining a running shared server" "$shared" "$base"
row "granary sandbox, reusing a granary mount" "$mount" "$base"
echo "8 at once, median wall time of the batch (ratio to 8 baselines at once):"
row "baseline x8" "$base8" "$base8"
row "granary sandbox x8 (shared server warm)" "$shared8" "$base8"
