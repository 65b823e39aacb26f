#!/usr/bin/env bash
# Fresh-mount walks of granary builds beside the source directory, alternating in one sitting:
# each round walks the source (warm) and then, for each build, a fresh mount of its store
# (store files warm, as in compare.sh), with compare.sh's `find -printf '%s %m'`.
# Usage: benches/walks.sh CORPUS_DIR ROUNDS LABEL=BINARY=STORE_DIR[=EXTRA_FLAGS]...
# (a store holds the corpus imported with `granary import --named CORPUS_DIR`; EXTRA_FLAGS,
# comma-separated, go to `granary mount`, e.g. `--no-poll`).
# Prints each walk and then, per system, the median in seconds and its ratio to the source's.
set -euo pipefail
corpus=$(realpath "$1") rounds=$2
shift 2
source "$(dirname "$0")/mount_common.sh" walks
root=$(basename "$corpus")
now() { date +%s.%N; }
walk() { local s; s=$(now); find "$1" -printf '%s %m\n' >/dev/null; echo "$(now) - $s" | bc; }
declare -A times
find "$corpus" -printf '%s %m\n' >/dev/null
for ((r = 1; r <= rounds; r++)); do
  line="source $(walk "$corpus")"
  times[source]+="${line#source } "
  for sys in "$@"; do
    mount_spec "$sys" "$root"
    t=$(walk "$mnt")
    unmount_spec
    times[$label]+="$t "
    line+="  $label $t"
  done
  echo "round $r: $line"
done
src=$(printf '%s\n' ${times[source]} | median)
echo "source median $src s"
for sys in "$@"; do
  label=${sys%%=*}
  m=$(printf '%s\n' ${times[$label]} | median)
  echo "$label median $m s ($(echo "scale=2; $m / $src" | bc)x source)"
done
