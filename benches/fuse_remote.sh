#!/usr/bin/env bash
# Cold FUSE read of a corpus through a granary daemon (grpc+unix, grpc+tcp on loopback) as a
# ratio to the same read from the local file:// store, measured in one run. Each read is on a
# fresh mount (empty FUSE and chunk caches); medians of RUNS. Run as root.
# Usage: benches/fuse_remote.sh [GRANARY_BIN] [CORPUS_DIR]
set -euo pipefail
bin=$(realpath "${1:-target/release/granary}")
corpus=$(realpath "${2:-/tmp/granary-bench/corpus/docs}")
runs=${RUNS:-3}
work=$(mktemp -d /tmp/granary-fuse-remote.XXXXXX)
mnt=$work/mnt; mkdir -p "$mnt"
daemon=""
cleanup() {
  fusermount3 -uz "$mnt" 2>/dev/null || true
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
store="file://$work/store"
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for p in "$corpus"/*; do "$bin" --store "$store" import --name "$(basename "$p")" "$p" >/dev/null; done
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
XDG_RUNTIME_DIR="" "$bin" --store "$store" daemon --listen "unix:$work/d.sock" --listen "127.0.0.1:$port" --allow-unauthenticated-tcp 2>"$work/daemon.log" &
daemon=$!
for _ in $(seq 200); do [[ -S $work/d.sock ]] && break; sleep 0.05; done
first=$(ls "$corpus" | head -1)
read_through() { # URL -> seconds for a cold read of everything
  "$bin" --store "$1" mount "$mnt" >"$work/mount.log" 2>&1 &
  local pid=$! s t
  for _ in $(seq 400); do stat "$mnt/$first" >/dev/null 2>&1 && break; sleep 0.025; done
  s=$(now); tar -cf - -C "$mnt" . | cat >/dev/null; t=$(echo "$(now) - $s" | bc)
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  echo "$t"
}
declare -A res
for url in "$store" "grpc+unix://$work/d.sock" "grpc+tcp://127.0.0.1:$port"; do
  times=()
  for ((k = 0; k < runs; k++)); do times+=("$(read_through "$url")"); done
  res[$url]=$(printf '%s\n' "${times[@]}" | median)
done
bytes=$(du -sb "$corpus" | cut -f1)
base=${res[$store]}
echo "corpus $corpus ($bytes bytes), cold FUSE read (tar), medians of $runs"
for url in "$store" "grpc+unix://$work/d.sock" "grpc+tcp://127.0.0.1:$port"; do
  t=${res[$url]}
  printf '%-12s %7.3f s  %7.1f MB/s  x%.2f of file://\n' "${url%%://*}" "$t" "$(echo "$bytes / $t / 1000000" | bc -l)" "$(echo "$t / $base" | bc -l)"
done
