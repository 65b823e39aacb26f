#!/usr/bin/env bash
# gc and verify time on a store holding a benchmark corpus (one root per store path), as a
# ratio to reading the same corpus directory (tar to a pipe) in the same run. Medians of RUNS.
# Usage: benches/health.sh [GRANARY_BIN] [CORPUS_DIR]   (default: release build, docs corpus)
set -euo pipefail
bin=$(realpath "${1:-target/release/granary}")
corpus=$(realpath "${2:-/tmp/granary-bench/corpus/docs}")
runs=${RUNS:-3}
work=$(mktemp -d /tmp/granary-health.XXXXXX)
trap 'rm -rf "$work"' EXIT
store="file://$work/store"
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for p in "$corpus"/*; do "$bin" --store "$store" import --name "$(basename "$p")" "$p" >/dev/null; done
# Garbage for gc to find: a second tree imported and removed.
"$bin" --store "$store" import --name garbage /usr/share/common-licenses >/dev/null
"$bin" --store "$store" rm garbage
tar -cf - -C "$corpus" . | cat >/dev/null
src=() ver=() gcd=() gcs=()
for ((k = 0; k < runs; k++)); do
  s=$(now); tar -cf - -C "$corpus" . | cat >/dev/null; src+=("$(echo "$(now) - $s" | bc)")
  s=$(now); "$bin" --store "$store" verify >/dev/null; ver+=("$(echo "$(now) - $s" | bc)")
  s=$(now); "$bin" --store "$store" gc --dry-run --grace 0s >/dev/null; gcd+=("$(echo "$(now) - $s" | bc)")
done
s=$(now); out=$("$bin" --store "$store" gc --grace 0s); gcs+=("$(echo "$(now) - $s" | bc)")
m_src=$(printf '%s\n' "${src[@]}" | median); m_ver=$(printf '%s\n' "${ver[@]}" | median)
m_gcd=$(printf '%s\n' "${gcd[@]}" | median)
echo "corpus $corpus ($(du -sb "$corpus" | cut -f1) bytes), store $(du -sb "$work/store" | cut -f1) bytes, runs $runs"
printf 'read source (tar)   %8.3f s\n' "$m_src"
printf 'verify              %8.3f s  (x%.2f of reading the source)\n' "$m_ver" "$(echo "$m_ver / $m_src" | bc -l)"
printf 'gc --dry-run (mark) %8.3f s  (x%.2f)\n' "$m_gcd" "$(echo "$m_gcd / $m_src" | bc -l)"
printf 'gc (sweep)          %8.3f s  %s\n' "${gcs[0]}" "$out"
