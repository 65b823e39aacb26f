#!/usr/bin/env bash
# Substitution from a Nix binary cache, in one run on one machine:
#   - first access of a store path through `granary mount --substituter` (one stat: narinfo,
#     NAR download, decompression, chunking, storing, recording), against
#   - `nix copy --from` the same cache into a fresh local (chroot) store,
# both from the same HTTP server on loopback (python3 -m http.server over a cache written by
# `nix copy --to file://...`, xz, signed); and the bytes granary stores for two versions of a
# package-like tree against the sum of their NARs (and of their xz files).
#
# Usage: benches/substitute.sh [V1_DIR V2_DIR]   (default: two pyenv Python installations'
#        standard libraries, ~100 MB each). Run as root (FUSE).
# Env: RUNS (default 3), GRANARY (binary; default target/release/granary, built if missing),
#      WORK (scratch; default /tmp/granary-bench/substitute).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
work=${WORK:-/tmp/granary-bench/substitute}
bin=$(realpath "${GRANARY:-target/release/granary}")
[[ -x $bin ]] || { cargo build --release --quiet; bin=$(realpath target/release/granary); }
v1=${1:-$(ls -d "$HOME"/.pyenv/versions/3.8.*/lib/python3.8 | head -1)}
v2=${2:-$(ls -d "$HOME"/.pyenv/versions/3.9.*/lib/python3.9 | head -1)}
command -v nix-store >/dev/null || { echo "substitute.sh: nix-store missing (apt-get install nix-bin)" >&2; exit 1; }

rm -rf "$work"; mkdir -p "$work"
export HOME=$work/home XDG_CACHE_HOME=$work/xdg NIX_STATE_DIR=$work/state NIX_LOG_DIR=$work/log
export NIX_CONFIG=$'experimental-features = nix-command\nsubstituters =\nsandbox = false'
mkdir -p "$HOME"
src=$work/src-store
# Package-like trees: the same name, two versions.
mkdir -p "$work/t1" "$work/t2"
cp -a "$v1" "$work/t1/pkg"; cp -a "$v2" "$work/t2/pkg"
p1=$(nix-store --store "$src" --add "$work/t1/pkg")
p2=$(nix-store --store "$src" --add "$work/t2/pkg")
nix-store --generate-binary-cache-key bench-1 "$work/sk" "$work/pk"
pk=$(cat "$work/pk")
cache=$work/cache
nix copy --from "$src" --to "file://$cache?compression=xz&secret-key=$work/sk" "$p1" "$p2"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$cache" && exec python3 -m http.server -b 127.0.0.1 "$port") >"$work/http.log" 2>&1 &
httpd=$!
mpid=
cleanup() {
  [[ -n $mpid ]] && kill "$mpid" 2>/dev/null || true
  mountpoint -q "$work/mnt" && fusermount3 -uz "$work/mnt" || true
  kill "$httpd" 2>/dev/null || true
}
trap cleanup EXIT
url=http://127.0.0.1:$port
for _ in $(seq 100); do curl -s -o /dev/null "$url/nix-cache-info" && break; sleep 0.1; done
field() { grep "^$2: " "$cache/$(basename "$1" | cut -c1-32).narinfo" | cut -d' ' -f2; }
nar1=$(field "$p1" NarSize) nar2=$(field "$p2" NarSize)
file1=$(field "$p1" FileSize) file2=$(field "$p2" FileSize)
echo "v1: $p1  NAR $nar1 bytes, xz $file1"
echo "v2: $p2  NAR $nar2 bytes, xz $file2"

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
mount_sub() { # STORE
  mkdir -p "$work/mnt"
  "$bin" --store "$1" mount "$work/mnt" --substituter "$url" --trusted-public-key "$pk" \
    --timeout 600 2>>"$work/mount.log" &
  mpid=$!
  for _ in $(seq 200); do mountpoint -q "$work/mnt" && return 0; sleep 0.02; done
  echo "mount did not come up" >&2; exit 1
}
unmount() { kill "$mpid"; wait "$mpid" || true; mpid=; }

: > "$work/g.txt"; : > "$work/n.txt"
for r in $(seq "$runs"); do
  # granary first, then nix copy, alternating, each from scratch.
  rm -rf "$work/gs"
  mount_sub "file://$work/gs"
  t0=$(now); stat "$work/mnt/$(basename "$p1")" >/dev/null; t1=$(now)
  echo "$t1 - $t0" | bc >> "$work/g.txt"
  unmount
  rm -rf "$work/dest"
  t0=$(now)
  nix copy --option trusted-public-keys "$pk" --from "$url" --to "$work/dest" "$p1"
  t1=$(now)
  echo "$t1 - $t0" | bc >> "$work/n.txt"
done
g=$(median < "$work/g.txt"); n=$(median < "$work/n.txt")
echo "first access of v1 (median of $runs): granary mount $g s, nix copy --from $n s, ratio $(echo "scale=2; $g / $n" | bc)"
echo "  granary runs: $(tr '\n' ' ' < "$work/g.txt")"
echo "  nix copy runs: $(tr '\n' ' ' < "$work/n.txt")"

# Both versions substituted into one store: what it holds against their NARs.
rm -rf "$work/gs"
mount_sub "file://$work/gs"
stat "$work/mnt/$(basename "$p1")" >/dev/null
stat "$work/mnt/$(basename "$p2")" >/dev/null
unmount
stored=$("$bin" --store "file://$work/gs" info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])')
disk=$(du -sb "$work/gs" | cut -f1)
nars=$((nar1 + nar2)); files=$((file1 + file2))
echo "two versions: granary stores $stored bytes (store dir $disk), NARs $nars, xz files $files"
echo "  stored / NARs $(echo "scale=3; $stored / $nars" | bc), stored / xz files $(echo "scale=3; $stored / $files" | bc)"
