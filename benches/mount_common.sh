# Shared by the benchmarks that mount (sourced, not run): a work directory with a mount point,
# removed on exit with any mount left there and the granary process in `pid`, and `median`.
# Usage: `source "$(dirname "$0")/mount_common.sh" NAME` sets `work` (/tmp/granary-NAME.XXXXXX),
# `mnt` and `pid`.
work=$(mktemp -d "/tmp/granary-$1.XXXXXX")
pid=""
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() {
  [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  grep -q " $mnt " /proc/self/mountinfo && umount -l "$mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# mount_spec LABEL=BINARY=STORE_DIR[=FLAG,FLAG...] ROOT: mounts the store at $mnt with that build
# (flags comma-separated; a `--file-cache` directory is emptied first), waits until $mnt/ROOT
# answers, and sets `label`; unmount_spec ends it.
mount_spec() {
  local bin store extra i flags=()
  IFS='=' read -r label bin store extra <<<"$1"
  [[ -n $extra ]] && IFS=',' read -r -a flags <<<"$extra"
  for ((i = 0; i < ${#flags[@]}; i++)); do
    [[ ${flags[i]} == --file-cache ]] && rm -rf "${flags[i + 1]}"
  done
  "$bin" --store "file://$store" mount "${flags[@]}" "$mnt" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 400); do stat "$mnt/$2" >/dev/null 2>&1 && return 0; sleep 0.005; done
  echo "$label: the mount did not answer" >&2
  return 1
}
unmount_spec() { kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }
