#!/usr/bin/env bash
# Object storage at WAN latency: import and cold read of a tree, and of one big file, into and
# from s3:// (moto_server on loopback) directly and through benches/latency_proxy.py (DELAY_MS
# each way, default 10: 20 ms per round trip), beside file:// in the same run.
#
# For each: seconds, ratio to file:// (file:// time / this time: 1.0 = as fast, 0.5 = twice as
# slow), and the S3 requests granary counted itself (GRANARY_S3_STATS=1 for imports, the
# mount's user.granary.ops xattr for reads). A cold read is `tar` of every file through a
# fresh mount with no disk cache, after dropping the page cache.
#
# Usage: benches/s3_wan.sh [TREE]  (default: the docs corpus /tmp/granary-bench/corpus/docs)
# Env: RUNS (default 3), DELAY_MS (default 10), BIG_MIB (size of the big file, default 512;
#      0 skips it), GRANARY (binary; default target/release/granary, built if missing),
#      WORK (scratch; default /tmp/granary-bench/s3wan).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
delay=${DELAY_MS:-10}
big_mib=${BIG_MIB:-512}
work=${WORK:-/tmp/granary-bench/s3wan}
tree=${1:-/tmp/granary-bench/corpus/docs}
[[ -d $tree ]] || { echo "s3_wan.sh: $tree missing (bash /work/shared/bench/corpus.sh)" >&2; exit 1; }
command -v moto_server >/dev/null || { echo "s3_wan.sh: moto_server missing (pip install 'moto[server]')" >&2; exit 1; }
bin=${GRANARY:-target/release/granary}
[[ -x $bin ]] || cargo build --release --quiet
bin=$(realpath "$bin")

rm -rf "$work"; mkdir -p "$work/mnt"
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(freeport); pport=$(freeport)
moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
python3 benches/latency_proxy.py "$pport" "$port" "$delay" &
proxy=$!
mpid=
cleanup() {
  [[ -n $mpid ]] && kill "$mpid" 2>/dev/null
  mountpoint -q "$work/mnt" && fusermount3 -uz "$work/mnt"
  kill "$moto" "$proxy" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
s3url() { echo "s3://$1?endpoint=http://127.0.0.1:$2&region=us-east-1&allow_http=true&timeout=120s"; }

big="$work/big"
if (( big_mib > 0 )); then
  mkdir -p "$big"
  head -c $((big_mib << 20)) /dev/urandom >"$big/big.bin"
fi

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
count() { grep -o "$2=[0-9]*" "$1" | tail -1 | cut -d= -f2 || true; }

# import URL SRC LOG: prints seconds; the request counts land in LOG.
import_tree() {
  local t0 t1
  t0=$(now)
  GRANARY_S3_STATS=1 "$bin" --store "$1" import --name t "$2" >/dev/null 2>"$3"
  t1=$(now)
  echo "$t1 - $t0" | bc
}

# cold_read URL OPS: mounts, tars every file, reads the mount's counters into OPS, unmounts;
# prints seconds.
cold_read() {
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  "$bin" --store "$1" mount "$work/mnt" --root t --timeout 120 2>"$work/mount.log" &
  mpid=$!
  for _ in $(seq 600); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
  local t0 t1
  t0=$(now)
  tar -cf - -C "$work/mnt" . | cat >/dev/null
  t1=$(now)
  getfattr --only-values -n user.granary.ops "$work/mnt" >"$2" 2>/dev/null || true
  kill -TERM "$mpid"; wait "$mpid" || true; mpid=
  echo "$t1 - $t0" | bc
}

# bench NAME SRC: RUNS rounds of import + cold read for file://, s3:// direct, s3:// + latency.
bench() {
  local name=$1 src=$2 mib
  mib=$(echo "$(du -sb --apparent-size "$src" | cut -f1) / 1048576" | bc -l)
  local i kind
  for kind in file direct wan; do : >"$work/ti_$kind"; : >"$work/tr_$kind"; done
  for i in $(seq "$runs"); do
    curl -s -X PUT "http://127.0.0.1:$port/b$name$i" >/dev/null
    for kind in file direct wan; do
      local url
      case $kind in
        file) url="file://$work/store-$name$i" ;;
        direct) url=$(s3url "b$name$i" "$port") ;;
        wan) url=$(s3url "b$name$i" "$pport") ;;
      esac
      if [[ $kind == wan ]]; then
        # A bucket of its own, so nothing is deduplicated against the direct import.
        curl -s -X PUT "http://127.0.0.1:$port/w$name$i" >/dev/null
        url=$(s3url "w$name$i" "$pport")
      fi
      import_tree "$url" "$src" "$work/imp_$kind" >>"$work/ti_$kind"
      cold_read "$url" "$work/ops_$kind" >>"$work/tr_$kind"
    done
  done
  local fi fr
  fi=$(median <"$work/ti_file"); fr=$(median <"$work/tr_file")
  echo "== $name: $(printf %.1f "$mib") MiB, $(find "$src" -type f | wc -l) files; runs $runs; round trip +$((2 * delay)) ms through the proxy; $(date -u +%FT%TZ)"
  printf '%-28s %9s %7s %28s %9s %7s %8s\n' "" "import s" "ratio" "requests (PUT/HEAD/GET/LIST)" "read s" "ratio" "GET/MiB"
  for kind in file direct wan; do
    local ti tr puts heads gets lists rgets
    ti=$(median <"$work/ti_$kind"); tr=$(median <"$work/tr_$kind")
    puts=$(count "$work/imp_$kind" PUT_requests); heads=$(count "$work/imp_$kind" HEAD_requests)
    gets=$(count "$work/imp_$kind" GET_requests); lists=$(count "$work/imp_$kind" LIST_requests)
    rgets=$(grep -o 's3_get_requests [0-9]*' "$work/ops_$kind" | cut -d' ' -f2 || true)
    local label
    case $kind in file) label="file://" ;; direct) label="s3:// direct" ;; wan) label="s3:// +$((2 * delay)) ms RTT" ;; esac
    printf '%-28s %9.2f %7.3f %28s %9.2f %7.3f %8s\n' "$label" "$ti" "$(echo "$fi/$ti" | bc -l)" \
      "${puts:--}/${heads:--}/${gets:--}/${lists:--}" "$tr" "$(echo "$fr/$tr" | bc -l)" \
      "$( [[ -n $rgets ]] && printf %.2f "$(echo "$rgets/$mib" | bc -l)" || echo -)"
  done
}

bench tree "$tree"
(( big_mib > 0 )) && bench big "$big"
