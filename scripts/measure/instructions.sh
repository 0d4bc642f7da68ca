#!/bin/bash
# User-space instructions per request of the server, counted by callgrind: deterministic to
# ~0.1 % run to run, where CPU time per request at QD1 swings by +-1 us (the kernel's wake-ups).
# For A/B of the ring's per-request code; it says nothing of the kernel's share.
# Usage: scripts/measure/instructions.sh TREE RW BS QD [N [serve args...]]
#   e.g.  scripts/measure/instructions.sh /work/main randread 4k 1 5000 --poll-us 0
# Needs valgrind (apt-get install valgrind). The server runs ~50x slower under callgrind; the
# counters are zeroed after a warm-up and dumped after N requests (default 5000).
set -euo pipefail
tree=$1; rw=$2; bs=$3; qd=$4; n=${5:-5000}; shift $(( $# < 5 ? $# : 5 ))
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is not installed" >&2; exit 2; }
d=$(mktemp -d /tmp/instructions.XXXX)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$d"' EXIT
valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" \
  "$tree/.venv/bin/python" "$tree/.venv/bin/blkback" serve -U "$d/s" --export disk=memory:256M \
  --control "$d/c" "$@" >"$d/log" 2>&1 & pid=$!
for _ in $(seq 600); do [ -S "$d/s" ] && break; sleep 0.1; done
uri="nbd+unix:///disk?socket=$d/s"
# --io_size past the export's end: fio wraps around until --number_ios requests are done
# (without it a sequential 1 MiB job stopped at the export's 256 MiB, after 256 requests).
fio_run() {
  fio --name="$1" --ioengine=nbd --uri="$uri" --rw="$2" --bs="$3" --iodepth="$4" --size=256M \
    --io_size=1T --number_ios="$5" --output-format=json --output="$d/$1.json" >/dev/null 2>&1
}
fio_run prefill write 1M 4 256          # every page of the export written once
fio_run warm "$rw" "$bs" "$qd" 2000     # pools grown, code paths warm
callgrind_control -z "$pid" >/dev/null 2>&1
fio_run measured "$rw" "$bs" "$qd" "$n"
callgrind_control -d "$pid" >/dev/null 2>&1
sleep 1
f=$(ls -t "$d"/cg.out* | head -1)
# Divide by the requests fio made, not by the number asked for.
done_ios=$(python3 -c 'import json, sys; j = json.load(open(sys.argv[1]))["jobs"][0]; print(j["read"]["total_ios"] + j["write"]["total_ios"])' "$d/measured.json")
[ "$done_ios" -eq "$n" ] || echo "instructions.sh: fio made $done_ios requests, not $n" >&2
awk -v n="$done_ios" '/^(summary|totals):/ {printf "%.0f instructions/request (%s %s QD%s, %d requests)\n", $2 / n, "'"$rw"'", "'"$bs"'", "'"$qd"'", n; exit}' "$f"
[ -n "${KEEP:-}" ] && cp "$f" "$KEEP" && echo "callgrind profile: $KEEP (callgrind_annotate --inclusive=yes $KEEP)"
true
