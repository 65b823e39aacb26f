#!/usr/bin/env bash
# Memory of a mount (issue 19): RSS and VmHWM of `granary mount` after a cold walk, after
# reading every file, and after `drop_caches` made the kernel forget its inodes; the live
# inode count beside each (the root's user.granary.inodes). Run as root (FUSE, drop_caches).
#
# Usage: benches/memory.sh [GRANARY_BIN] [CORPUS_DIR] [RUNS] [CACHE_SIZE] [-- MOUNT_ARGS...]
#   GRANARY_BIN  default target/release/granary
#   CORPUS_DIR   default /tmp/granary-bench/corpus/pystore (see /work/shared/bench/corpus.sh)
#   RUNS         default 3 (a fresh mount each; the store is imported once)
#   CACHE_SIZE   the mount's --cache-size, default 256M (the target: RSS <= it + 100 MB)
# Prints one line per run (MB; read_s: the tar of every file, from a cold page cache) and
# the medians.
set -euo pipefail
bin=$(realpath "${1:-target/release/granary}")
corpus=$(realpath "${2:-/tmp/granary-bench/corpus/pystore}")
runs=${3:-3}
cache=${4:-256M}
shift $(( $# < 4 ? $# : 4 ))
[[ ${1:-} == -- ]] && shift
[[ -x $bin ]] || { echo "no granary binary at $bin" >&2; exit 2; }
[[ -d $corpus ]] || { echo "no corpus at $corpus (run corpus.sh)" >&2; exit 2; }

source "$(dirname "$0")/mount_common.sh" mem-bench

kb() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$pid/status"; }
mb() { echo "$(( $(kb "$1") / 1000 ))"; }
heap() { getfattr --only-values -n user.granary.ops "$mnt" 2>/dev/null |
  awk '/^heap_in_use|^heap_free_kept|^chunk_cache_bytes/ {printf "%s %d MB, ", $1, $2/1e6}'; }
inodes() { getfattr --only-values -n user.granary.inodes "$mnt" 2>/dev/null | head -1 | tr -dc 0-9; }

"$bin" --store "file://$work/store" import --name t "$corpus" >/dev/null 2>&1
echo "store: $(du -sb "$work/store" | cut -f1) bytes; cache $cache; args: $*"
printf '%-4s %10s %10s %10s %10s %10s %8s %8s\n' run walk_rss read_rss read_hwm forget_rss inodes_rd inodes_fg read_s
for r in $(seq 1 "$runs"); do
  sync; echo 3 > /proc/sys/vm/drop_caches
  "$bin" --store "file://$work/store" mount "$mnt" --cache-size "$cache" "$@" >/dev/null 2>>"$work/log" &
  pid=$!
  for _ in $(seq 600); do [[ -e $mnt/t ]] && break; sleep 0.05; done
  [[ -e $mnt/t ]] || { echo "mount did not come up" >&2; cat "$work/log" >&2; exit 1; }
  find "$mnt/t" >/dev/null
  walk=$(mb VmRSS)
  s=$EPOCHREALTIME
  tar -cf - -C "$mnt/t" . | cat >/dev/null
  read_s=$(echo "$EPOCHREALTIME - $s" | bc -l)
  read_rss=$(mb VmRSS); hwm=$(mb VmHWM); ird=$(inodes)
  echo "  run $r after the read: RssAnon $(mb RssAnon) MB, RssFile $(mb RssFile) MB; $(heap)" >&2
  echo 2 > /proc/sys/vm/drop_caches; sleep 2
  forget=$(mb VmRSS); ifg=$(inodes)
  echo "  run $r after drop_caches: $(heap)" >&2
  printf '%-4s %10s %10s %10s %10s %10s %8s %8.2f\n' "$r" "$walk" "$read_rss" "$hwm" "$forget" "$ird" "$ifg" "$read_s" | tee -a "$work/rows"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  for _ in $(seq 100); do grep -q " $mnt " /proc/self/mountinfo || break; sleep 0.05; done
done
for c in 2 3 4 5 8; do
  printf '%s ' "$(awk -v c=$c '{print $c}' "$work/rows" | median)"
done | awk '{printf "median MB: walk %s, read %s (VmHWM %s), after drop_caches %s; cold read of all %s s\n", $1, $2, $3, $4, $5}'
