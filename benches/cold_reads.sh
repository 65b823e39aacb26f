#!/usr/bin/env bash
# Cold reads of a store's named roots: for each measurement a fresh mount after dropping the
# kernel's caches (so the store itself is read from disk too), timing `find` of the mount, `cat`
# of the corpus' largest file, and `tar` of everything. Run it for two builds (and their
# stores) alternately to compare them in one sitting. Needs root (drop_caches, FUSE).
# Usage: benches/cold_reads.sh GRANARY STORE_DIR CORPUS_DIR [walk|big|all]...
# (STORE_DIR holds CORPUS_DIR's entries imported with `granary import --named CORPUS_DIR/*`.)
# Prints one line: walk=SECONDS big=SECONDS all=SECONDS.
set -euo pipefail
bin=$1 store=$2 corpus=$3
shift 3
what=("${@:-walk}")
(($# == 0)) && what=(walk big all)
source "$(dirname "$0")/mount_common.sh" cold-reads
big=$(cd "$corpus" && find . -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
now() { date +%s.%N; }
one() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  "$bin" --store "file://$store" mount $EXTRA "$mnt" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 200); do mountpoint -q "$mnt" && break; sleep 0.05; done
  mountpoint -q "$mnt" || { echo "mount did not come up" >&2; exit 1; }
  local s e
  s=$(now)
  case $1 in
    walk) find "$mnt" >/dev/null ;;
    big) cat "$mnt/${big#./}" >/dev/null ;;
    all) tar -cf - "$mnt" 2>/dev/null | cat >/dev/null ;;
  esac
  e=$(now)
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  pid=""
  printf '%s=%s ' "$1" "$(echo "$e - $s" | bc)"
}
EXTRA=${EXTRA:-}
for w in "${what[@]}"; do one "$w"; done
echo
