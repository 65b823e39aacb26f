#!/usr/bin/env bash
# NAR throughput against Nix, in one run on one machine: `nix-store --dump` of a tree (the
# baseline) vs granary's `import-nar` (a NAR file into a fresh store), `import-store` (the
# tree itself: dump + import in one pass, NAR hash and references included) and `export-nar`
# (the stored tree rendered back as a NAR). import-nar into memory:// isolates the reader's own
# cost from the local store's writes (compress, fsync, rename per object). Prints medians of RUNS runs and the ratios to the
# baseline; also checks export-nar's output equals Nix's.
#
# Usage: benches/nar.sh [TREE]   (default: the docs corpus, /tmp/granary-bench/corpus/docs/*-doc,
#        created from /usr/share/doc if missing). Env: RUNS (default 5), GRANARY (binary; default
#        target/release/granary, built if missing), WORK (scratch dir; default /tmp/granary-bench/nar).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
work=${WORK:-/tmp/granary-bench/nar}
command -v nix-store >/dev/null || { echo "nar.sh: nix-store missing (apt-get install nix-bin)" >&2; exit 1; }

tree=${1:-}
if [[ -z $tree ]]; then
  docs=/tmp/granary-bench/corpus/docs
  tree=$(ls -d "$docs"/*-doc 2>/dev/null | head -1 || true)
  if [[ -z $tree ]]; then
    # Same naming as /work/shared/bench/corpus.sh, docs set only.
    h=$(printf '%s' "docs/doc" | sha256sum | head -c 32 | tr '0-9a-f' '0123456789abcdfg')
    tree=$docs/$h-doc
    mkdir -p "$docs"
    cp -a /usr/share/doc "$tree.tmp" && mv "$tree.tmp" "$tree"
  fi
fi
name=$(basename "$tree")

bin=${GRANARY:-target/release/granary}
if [[ ! -x $bin ]]; then
  cargo build --release --quiet
fi

rm -rf "$work"
mkdir -p "$work/storedir"
# import-store wants a directory of store paths.
cp -a "$tree" "$work/storedir/$name"
nix-store --dump "$tree" >"$work/tree.nar"
bytes=$(stat -c %s "$work/tree.nar")

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

: >"$work/dump" ; : >"$work/import" ; : >"$work/mem" ; : >"$work/store" ; : >"$work/export"
for i in $(seq "$runs"); do
  t0=$(now); nix-store --dump "$tree" >/dev/null; t1=$(now)
  echo "$t1 - $t0" | bc >>"$work/dump"

  rm -rf "$work/s1"
  t0=$(now); "$bin" --store "file://$work/s1" import-nar "$work/tree.nar" --name "$name" >/dev/null; t1=$(now)
  echo "$t1 - $t0" | bc >>"$work/import"

  # The same into memory://: the reader's own cost (parse, hash, chunk), without disk writes.
  t0=$(now); "$bin" --store memory:// import-nar "$work/tree.nar" --name "$name" >/dev/null; t1=$(now)
  echo "$t1 - $t0" | bc >>"$work/mem"

  rm -rf "$work/s2"
  t0=$(now); "$bin" --store "file://$work/s2" import-store "$work/storedir" >/dev/null 2>&1; t1=$(now)
  echo "$t1 - $t0" | bc >>"$work/store"

  t0=$(now); "$bin" --store "file://$work/s1" export-nar "$name" >/dev/null; t1=$(now)
  echo "$t1 - $t0" | bc >>"$work/export"
done
"$bin" --store "file://$work/s1" export-nar "$name" | cmp - "$work/tree.nar" \
  || { echo "nar.sh: export-nar output differs from nix-store --dump" >&2; exit 1; }

d=$(median <"$work/dump"); im=$(median <"$work/import"); me=$(median <"$work/mem"); st=$(median <"$work/store"); ex=$(median <"$work/export")
mbs() { echo "scale=1; $bytes / $1 / 1000000" | bc; }
ratio() { echo "scale=2; $1 / $d" | bc; }
echo "tree: $tree  NAR: $bytes bytes  runs: $runs  ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-34s %9s %9s %14s\n' "operation" "median s" "MB/s" "x nix --dump"
printf '%-34s %9.3f %9s %14s\n' "nix-store --dump (baseline)" "$d" "$(mbs "$d")" "1.00"
printf '%-34s %9.3f %9s %14s\n' "granary import-nar (fresh store)" "$im" "$(mbs "$im")" "$(ratio "$im")"
printf '%-34s %9.3f %9s %14s\n' "granary import-nar (memory://)" "$me" "$(mbs "$me")" "$(ratio "$me")"
printf '%-34s %9.3f %9s %14s\n' "granary import-store (fresh store)" "$st" "$(mbs "$st")" "$(ratio "$st")"
printf '%-34s %9.3f %9s %14s\n' "granary export-nar" "$ex" "$(mbs "$ex")" "$(ratio "$ex")"
