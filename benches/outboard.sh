#!/usr/bin/env bash
# What verified partial reads cost: random 4 KiB reads of a large file through a fresh mount
# (every read checked against the blob digest through the outboard) and `granary verify` of
# a corpus, with this binary beside an older one (without outboards) in one run, alternating;
# and the outboards' bytes as a fraction of the store.
#
# Usage: benches/outboard.sh OLD_BINARY [CORPUS]   (default corpus: the docs corpus)
# Env: RUNS (default 3), READS (random reads per run, default 2000), GRANARY (new binary;
#      default target/release/granary), WORK (default /tmp/granary-bench/outboard).
# Run as root (FUSE).
set -euo pipefail
cd "$(dirname "$0")/.."
old=$(realpath "$1")
corpus=${2:-/tmp/granary-bench/corpus/docs}
new=$(realpath "${GRANARY:-target/release/granary}")
runs=${RUNS:-3}
reads=${READS:-2000}
work=${WORK:-/tmp/granary-bench/outboard}
rm -rf "$work"; mkdir -p "$work/src" "$work/mnt"
head -c $((512 << 20)) /dev/urandom > "$work/src/big"
mpid=
cleanup() {
  [[ -n $mpid ]] && kill "$mpid" 2>/dev/null || true
  mountpoint -q "$work/mnt" && fusermount3 -uz "$work/mnt" || true
}
trap cleanup EXIT
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

for bin in old new; do
  b=${!bin}
  "$b" --store "file://$work/$bin" import --name big "$work/src" >/dev/null
  "$b" --store "file://$work/$bin" import --name corpus "$corpus" >/dev/null
done

# Random reads: a fresh mount per run; reports the median latency of one 4 KiB pread.
randread() { # BIN STORE
  "$1" --store "file://$2" mount "$work/mnt" --root big --readahead 0 2>/dev/null &
  mpid=$!
  for _ in $(seq 200); do mountpoint -q "$work/mnt" && break; sleep 0.02; done
  python3 - "$work/mnt/big" "$reads" <<'PY'
import os, random, statistics, sys, time
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
rnd = random.Random(7)
lat = []
for _ in range(n):
    off = rnd.randrange(0, size - 4096) & ~4095
    t = time.perf_counter()
    os.pread(fd, 4096, off)
    lat.append(time.perf_counter() - t)
print(f"{statistics.median(lat) * 1e6:.1f}")
PY
  kill "$mpid"; wait "$mpid" || true; mpid=
}

for r in $(seq "$runs"); do
  for bin in old new; do
    b=${!bin}
    randread "$b" "$work/$bin" >> "$work/read-$bin"
    t0=$(now); "$b" --store "file://$work/$bin" verify >/dev/null; t1=$(now)
    echo "$t1 - $t0" | bc >> "$work/verify-$bin"
  done
done
for bin in old new; do
  echo "$bin: random 4 KiB read, fresh mount, median of medians $(median < "$work/read-$bin") us; verify $(median < "$work/verify-$bin") s"
  echo "   runs: read $(tr '\n' ' ' < "$work/read-$bin")| verify $(tr '\n' ' ' < "$work/verify-$bin")"
done
idx() { "$1" --store "file://$2" info --json --dedup | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["dedup"]["blob_index_bytes"], j["stored_bytes"])'; }
read -r oi os_ < <(idx "$old" "$work/old")
read -r ni ns < <(idx "$new" "$work/new")
echo "blob index bytes: old $oi, new $ni (outboards and checksums: $((ni - oi)) bytes); stored bytes old $os_, new $ns"
echo "outboards as a fraction of stored bytes: $(echo "scale=5; ($ni - $oi) / $ns" | bc)"
