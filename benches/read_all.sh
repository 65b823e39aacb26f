#!/usr/bin/env bash
# Read everything (compare.sh's `tar | cat`) through a fresh mount twice — cold (store files
# warm, mount caches empty) and warm (the same mount again) — for granary builds beside the
# source directory read warm, alternating in one sitting.
# Usage: benches/read_all.sh CORPUS_DIR ROUNDS LABEL=BINARY=STORE_DIR[=EXTRA_FLAGS]...
# (a store holds the corpus imported with `granary import --named CORPUS_DIR`; EXTRA_FLAGS,
# comma-separated, go to `granary mount`: e.g. `--file-cache,/tmp/fc` to measure passthrough;
# a file cache directory is emptied before each mount.)
# Prints each round and, per system, the medians in seconds with the warm read's ratio to the
# source's.
set -euo pipefail
corpus=$(realpath "$1") rounds=$2
shift 2
source "$(dirname "$0")/mount_common.sh" read-all
root=$(basename "$corpus")
now() { date +%s.%N; }
readall() { local s; s=$(now); tar -cf - -C "$1" . | cat >/dev/null; echo "$(now) - $s" | bc; }
declare -A cold warm
readall "$corpus" >/dev/null
for ((r = 1; r <= rounds; r++)); do
  src=$(readall "$corpus")
  warm[source]+="$src "
  line="source $src"
  for sys in "$@"; do
    mount_spec "$sys" "$root"
    c=$(readall "$mnt") w=$(readall "$mnt")
    unmount_spec
    cold[$label]+="$c " warm[$label]+="$w "
    line+="  $label $c/$w"
  done
  echo "round $r: $line"
done
src=$(printf '%s\n' ${warm[source]} | median)
echo "source (warm) median $src s"
for sys in "$@"; do
  label=${sys%%=*}
  c=$(printf '%s\n' ${cold[$label]} | median) w=$(printf '%s\n' ${warm[$label]} | median)
  echo "$label median cold $c s, warm $w s ($(echo "scale=2; $w / $src" | bc)x source)"
done
