#!/bin/bash
# What a 4 KiB request at QD1 costs each kind of server on this machine, interleaved:
# blkback (adaptive spinning, and --poll-us 0), the interpreted floor server (sleeping and
# spinning), its two-thread hand-off, and nbdkit with 16, 1 and 2 threads; then the same
# single-threaded servers with fio on one CPU (PIN), where a wake-up is a local switch.
# docs/data-path.md section 10 reads it.
# Usage: scripts/measure/qd1_floors.sh [ROUNDS]   (default 3; ~2.5 min a round; RT as cpu_split.sh)
rounds=${1:-3}
here=$(cd "$(dirname "$0")/../.." && pwd)
split="$here/scripts/measure/cpu_split.sh"
floor="$here/scripts/measure/floor_server.py"
handoff="$here/scripts/measure/handoff_server.py"
cell() {  # NAME RW then cpu_split.sh's SERVER [args]
  local name=$1 rw=$2; shift 2
  printf '%-10s %-15s %s\n' "$rw" "$name" "$("$split" "$1" "$rw" 4k 1 "${@:2}")"
}
for r in $(seq "$rounds"); do
  echo "== round $r, $(date -u +%H:%M:%S) UTC"
  for rw in randwrite randread; do
    cell blkback "$rw" "$here" --pressure off
    cell blkback-nopoll "$rw" "$here" --pressure off --poll-us 0
    SPIN=0 cell floor "$rw" "$floor"
    SPIN=1 cell floor-spin "$rw" "$floor"
    THREADS=2 cell handoff-2 "$rw" "$handoff"
    cell nbdkit "$rw" nbdkit
    cell nbdkit-t1 "$rw" nbdkit --threads 1
    cell nbdkit-t2 "$rw" nbdkit --threads 2
  done
done
echo "== pinned: server and fio on CPU 0, $(date -u +%H:%M:%S) UTC"
for rw in randwrite randread; do
  PIN=0 cell blkback-nopoll "$rw" "$here" --pressure off --poll-us 0
  PIN=0 SPIN=0 cell floor "$rw" "$floor"
  PIN=0 cell nbdkit "$rw" nbdkit
  PIN=0 cell nbdkit-t1 "$rw" nbdkit --threads 1
done
