#!/usr/bin/env bash
# FUSE read throughput from s3:// (moto_server on loopback) against the local file:// store, in
# one run on one machine: every file of a tree is read through a fresh mount (`cat` of all
# files, in order) from
#   - file://                              the baseline
#   - s3://, cold: no disk cache            every chunk crosses the network
#   - s3://, warm: --cache-dir already full  the disk cache serves every chunk
# plus the S3 GET requests per MiB read with the mount's default readahead (16M over s3://) and without
# (--readahead 0), counted by granary itself (GRANARY_S3_STATS=1 prints them at exit).
# Prints medians of RUNS runs and the ratios to the baseline.
#
# Usage: benches/s3.sh [TREE]  (default: the docs corpus /tmp/granary-bench/corpus/docs).
# Env: RUNS (default 3), READERS (files read at once, default 1: one `cat` after another), GRANARY (binary; default target/release/granary, built if missing),
#      WORK (scratch; default /tmp/granary-bench/s3).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
readers=${READERS:-1}
work=${WORK:-/tmp/granary-bench/s3}
tree=${1:-/tmp/granary-bench/corpus/docs}
[[ -d $tree ]] || { echo "s3.sh: $tree missing (bash /work/shared/bench/corpus.sh)" >&2; exit 1; }
command -v moto_server >/dev/null || { echo "s3.sh: moto_server missing (pip install 'moto[server]')" >&2; exit 1; }
bin=${GRANARY:-target/release/granary}
[[ -x $bin ]] || cargo build --release --quiet

rm -rf "$work"; mkdir -p "$work/mnt"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
mpid=
cleanup() {
  [[ -n $mpid ]] && kill "$mpid" 2>/dev/null
  mountpoint -q "$work/mnt" && fusermount3 -uz "$work/mnt"
  kill "$moto" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
curl -s -X PUT "http://127.0.0.1:$port/bench" >/dev/null
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
s3="s3://bench?endpoint=http://127.0.0.1:$port&region=us-east-1&allow_http=true"
file="file://$work/store"

"$bin" --store "$file" import --name t "$tree" >/dev/null
"$bin" --store "$s3" import --name t "$tree" >/dev/null
bytes=$(du -sb --apparent-size "$tree" | cut -f1)
mib=$(echo "$bytes / 1048576" | bc -l)

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# read URL LOG [mount args...]: mounts, reads every file, unmounts; prints seconds.
read_tree() {
  local url=$1 log=$2; shift 2
  GRANARY_S3_STATS=1 "$bin" --store "$url" mount "$work/mnt" --root t "$@" 2>"$log" &
  mpid=$!
  for _ in $(seq 300); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
  local t0 t1
  t0=$(now)
  find "$work/mnt" -type f -print0 | xargs -0 -P "$readers" -n 32 cat >/dev/null
  t1=$(now)
  kill -TERM "$mpid"; wait "$mpid" || true; mpid=
  echo "$t1 - $t0" | bc
}
gets() { grep -o 'GET_requests=[0-9]*' "$1" | cut -d= -f2; }

: >"$work/t_file"; : >"$work/t_cold"; : >"$work/t_warm"; : >"$work/t_noahead"
: >"$work/g_cold"; : >"$work/g_noahead"
for i in $(seq "$runs"); do
  read_tree "$file" "$work/log" >>"$work/t_file"
  read_tree "$s3" "$work/log" >>"$work/t_cold"; gets "$work/log" >>"$work/g_cold"
  read_tree "$s3" "$work/log" --readahead 0 >>"$work/t_noahead"; gets "$work/log" >>"$work/g_noahead"
  rm -rf "$work/cache"
  read_tree "$s3" "$work/log" --cache-dir "$work/cache" >/dev/null # fills the cache
  read_tree "$s3" "$work/log" --cache-dir "$work/cache" >>"$work/t_warm"
  echo "warm GETs: $(gets "$work/log")" >>"$work/g_warm"
done

tf=$(median <"$work/t_file"); tc=$(median <"$work/t_cold"); tw=$(median <"$work/t_warm")
tn=$(median <"$work/t_noahead")
gc=$(median <"$work/g_cold"); gn=$(median <"$work/g_noahead")
echo "tree: $tree ($(printf %.1f "$mib") MiB, $(find "$tree" -type f | wc -l) files); runs: $runs; readers: $readers; $(date -u +%FT%TZ)"
printf '%-34s %8.2f s %8.1f MiB/s  ratio %.3f\n' \
  "file:// (baseline)" "$tf" "$(echo "$mib/$tf" | bc -l)" 1 \
  "s3:// cold, default readahead" "$tc" "$(echo "$mib/$tc" | bc -l)" "$(echo "$tf/$tc" | bc -l)" \
  "s3:// cold, readahead 0" "$tn" "$(echo "$mib/$tn" | bc -l)" "$(echo "$tf/$tn" | bc -l)" \
  "s3:// warm (disk cache)" "$tw" "$(echo "$mib/$tw" | bc -l)" "$(echo "$tf/$tw" | bc -l)"
printf 'GET requests per MiB read: default readahead %.2f, readahead 0 %.2f; warm cache: %s\n' \
  "$(echo "$gc/$mib" | bc -l)" "$(echo "$gn/$mib" | bc -l)" "$(tail -1 "$work/g_warm")"
