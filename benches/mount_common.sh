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
