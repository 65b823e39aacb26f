#!/usr/bin/env bash
# FUSE benchmark for `granary mount`, every figure a ratio to the source directory measured in
# the same run (medians of RUNS). Run as root (FUSE mounts, drop_caches).
#
# Usage: benches/fuse.sh [GRANARY_BIN] [CORPUS_DIR] [RUNS] [BIG_MIB]
#   GRANARY_BIN  default target/release/granary (build it with `cargo build --release`)
#   CORPUS_DIR   default /tmp/granary-bench/corpus/docs (see /work/shared/bench/corpus.sh)
#   RUNS         default 3
#   BIG_MIB      size of the generated incompressible large file, default 512
#
# Measured:
#   big_read     sequential read (cat) of one large file: source warm (page cache, the limit)
#                vs. a fresh granary mount (new mount, FUSE caches empty, store files may be
#                in the page cache)
#   corpus_read  read every file of the corpus (tar | cat): source warm vs. fresh mount
#   walk         find -printf '%s %m' over the corpus: source warm vs. fresh mount, and warm mount
#   mount_ms     `granary mount` start to the first successful stat of an entry, for an empty
#                store (stat of the mount root) and for a store of 100 000 named roots
#   big_read, file cache: the large file from a fresh mount with `--file-cache` holding it
#                (filled by an earlier mount): served by FUSE passthrough
#   ops          the requests a fresh-mount walk cost, by kind (the root's user.granary.ops)
set -euo pipefail
bin=$(realpath "${1:-target/release/granary}")
corpus=$(realpath "${2:-/tmp/granary-bench/corpus/docs}")
runs=${3:-3}
big_mib=${4:-512}
[[ -x $bin ]] || { echo "no granary binary at $bin" >&2; exit 2; }
[[ -d $corpus ]] || { echo "no corpus at $corpus (run corpus.sh)" >&2; exit 2; }

source "$(dirname "$0")/mount_common.sh" fuse-bench

now() { date +%s.%N; }
timeit() { local s; s=$(now); "$@" >/dev/null 2>&1; echo "$(now) - $s" | bc -l; }
walk() { find "$1" -printf '%s %m\n' >/dev/null; }
readall() { tar -cf - -C "$1" . | cat >/dev/null; }

# mount_g STORE FIRST [ARGS...]: starts granary, waits for the first stat of FIRST; sets
# last_ms to the milliseconds that took (not printed: granary must not hold a $(...) pipe).
# The wait probes with shell builtins only, so no fork per probe inflates the figure.
mount_g() {
  local store=$1 first=$2; shift 2
  local s=$EPOCHREALTIME
  "$bin" --store "file://$store" mount "$mnt" "$@" >/dev/null 2>>"$work/mount.log" &
  pid=$!
  local deadline=$(( ${s%.*} + 60 )) mi
  # For "." (an empty store) the mount showing up in mountinfo counts.
  until if [[ $first == . ]]; then mapfile -t mi </proc/self/mountinfo; [[ " ${mi[*]} " == *" $mnt "* ]];
        else [[ -e $mnt/$first ]]; fi; do
    (( ${EPOCHREALTIME%.*} < deadline )) || { echo "mount did not come up" >&2; cat "$work/mount.log" >&2; exit 1; }
  done
  last_ms=$(echo "($EPOCHREALTIME - $s) * 1000" | bc -l)
}
umount_g() { kill -TERM "$pid"; wait "$pid" || true; pid=""; }

echo "building stores in $work ..." >&2
src_big=$work/big-src
mkdir -p "$src_big"
head -c "$((big_mib << 20))" /dev/urandom > "$src_big/big.bin"
store=$work/store
name=$(basename "$corpus")
"$bin" --store "file://$store" import --name "$name" "$corpus" >/dev/null
"$bin" --store "file://$store" import --name big "$src_big" >/dev/null

# A store of 100 000 roots: one real root record, re-encoded under 100 000 names.
roots_store=$work/roots-store
mkdir -p "$work/seed/sub" && echo seed > "$work/seed/sub/file"
"$bin" --store "file://$roots_store" import --name seed "$work/seed" >/dev/null
python3 - "$roots_store/roots" <<'EOF'
import os, sys
d = sys.argv[1]
raw = open(os.path.join(d, "seed"), "rb").read()
def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7f) | 0x80); v >>= 7
    out.append(v); return bytes(out)
def read_varint(b, i):
    v = s = 0
    while True:
        c = b[i]; i += 1; v |= (c & 0x7f) << s; s += 7
        if c < 0x80: return v, i
assert raw[0] == 0x0a
n, i = read_varint(raw, 1)
rest = raw[i + n:]
for k in range(100_000):
    name = ("%032x-root-%d" % (k * 2654435761 % (1 << 128), k)).encode()
    with open(os.path.join(d, name.decode()), "wb") as f:
        f.write(b"\x0a" + varint(len(name)) + name + rest)
EOF
empty_store=$work/empty-store
"$bin" --store "file://$empty_store" info >/dev/null
first_root=$(printf "%032x-root-0" 0)

# The source: warm (the limit).
cat "$src_big/big.bin" >/dev/null; readall "$corpus"; walk "$corpus"
src_big_s=() src_read_s=() src_walk_s=()
for ((k = 0; k < runs; k++)); do
  src_big_s+=("$(timeit cat "$src_big/big.bin")")
  src_read_s+=("$(timeit readall "$corpus")")
  src_walk_s+=("$(timeit walk "$corpus")")
done

# The file cache, filled once by a mount that reads the big file.
fc=$work/file-cache
mount_g "$store" big --file-cache "$fc"
cat "$mnt/big/big.bin" >/dev/null
for ((w = 0; w < 600; w++)); do
  getfattr --only-values -n user.granary.ops "$mnt" 2>/dev/null | grep -q '^file_cache_filled 1' && break
  sleep 0.1
done
umount_g

g_big_s=() g_bigfc_s=() g_read_s=() g_walk_s=() g_walkw_s=() m_empty=() m_roots=()
for ((k = 0; k < runs; k++)); do
  mount_g "$store" big; g_big_s+=("$(timeit cat "$mnt/big/big.bin")"); umount_g
  mount_g "$store" big --file-cache "$fc"; g_bigfc_s+=("$(timeit cat "$mnt/big/big.bin")"); umount_g
  mount_g "$store" "$name"; g_read_s+=("$(timeit readall "$mnt/$name")"); umount_g
  mount_g "$store" "$name"
  g_walk_s+=("$(timeit walk "$mnt/$name")")
  [[ $k == 0 ]] && getfattr --only-values -n user.granary.ops "$mnt" > "$work/ops" 2>/dev/null
  g_walkw_s+=("$(timeit walk "$mnt/$name")"); umount_g
  mount_g "$empty_store" .; m_empty+=("$last_ms"); umount_g
  mount_g "$roots_store" "$first_root"; m_roots+=("$last_ms"); umount_g
done

med() { printf '%s\n' "$@" | median; }
sb=$(med "${src_big_s[@]}") gb=$(med "${g_big_s[@]}") gbfc=$(med "${g_bigfc_s[@]}")
sr=$(med "${src_read_s[@]}") gr=$(med "${g_read_s[@]}")
sw=$(med "${src_walk_s[@]}") gw=$(med "${g_walk_s[@]}") gww=$(med "${g_walkw_s[@]}")
corpus_bytes=$(du -sb "$corpus" | cut -f1)
mbs() { echo "$1 / $2 / 1000000" | bc -l; }
echo "granary FUSE benchmark  $(date -u +%FT%TZ)  runs=$runs  corpus=$corpus ($corpus_bytes bytes)  big file=${big_mib} MiB"
printf '%-28s %12s %12s %10s\n' metric source granary ratio
printf '%-28s %12.0f %12.0f %9.2fx\n' "big file read MB/s (cold)" "$(mbs $((big_mib << 20)) "$sb")" "$(mbs $((big_mib << 20)) "$gb")" "$(echo "$gb / $sb" | bc -l)"
printf '%-28s %12.0f %12.0f %9.2fx\n' "big file, file cache MB/s" "$(mbs $((big_mib << 20)) "$sb")" "$(mbs $((big_mib << 20)) "$gbfc")" "$(echo "$gbfc / $sb" | bc -l)"
printf '%-28s %12.0f %12.0f %9.2fx\n' "corpus read MB/s (cold)" "$(mbs "$corpus_bytes" "$sr")" "$(mbs "$corpus_bytes" "$gr")" "$(echo "$gr / $sr" | bc -l)"
printf '%-28s %12.3f %12.3f %9.2fx\n' "walk s (fresh mount)" "$sw" "$gw" "$(echo "$gw / $sw" | bc -l)"
printf '%-28s %12.3f %12.3f %9.2fx\n' "walk s (warm mount)" "$sw" "$gww" "$(echo "$gww / $sw" | bc -l)"
printf '%-28s %12s %12.1f\n' "mount->stat ms, empty store" - "$(med "${m_empty[@]}")"
printf '%-28s %12s %12.1f\n' "mount->stat ms, 100k roots" - "$(med "${m_roots[@]}")"
echo "(ratio = granary time / source time: lower is better; source is read warm, the limit)"
echo "requests of one fresh-mount walk:"; sed 's/^/  /' "$work/ops"
