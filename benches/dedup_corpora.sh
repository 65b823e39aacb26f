#!/usr/bin/env bash
# Runs `granary dedup` (release build) on the benchmark corpora, one at a time, and writes the
# table, JSON, CSV and SVG plot of each under benches/results/.
# Usage: benches/dedup_corpora.sh [CORPUS...]   (default: docs pystore toolchains)
# Each store path / toolchain directory is one input, so the marginal gains show what each
# added version costs given the ones before it. Extra `granary dedup` options: $DEDUP_OPTS.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus_root=${CORPUS_ROOT:-/tmp/granary-bench/corpus}
out=benches/results
mkdir -p "$out"
cargo build --release --quiet
bin=target/release/granary
for c in "${@:-docs pystore toolchains}"; do
  for name in $c; do
    dir=$corpus_root/$name
    [[ -d $dir ]] || { echo "$dir missing: run ../shared/bench/corpus.sh" >&2; exit 1; }
    mapfile -t inputs < <(find "$dir" -mindepth 1 -maxdepth 1 | sort)
    echo "== $name: ${#inputs[@]} inputs ($(date -u +%FT%TZ))"
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    "$bin" --store /nonexistent-granary-store dedup --format table --json "$out/dedup-$name.json" \
      --plot "$out/dedup-$name.svg" ${DEDUP_OPTS:-} "${inputs[@]}" > "$out/dedup-$name.txt"
    end=$(date +%s.%N)
    echo "elapsed $(echo "$end - $start" | bc) s"
    cat "$out/dedup-$name.txt"
  done
done
