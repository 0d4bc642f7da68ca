#!/bin/bash
# Server user and system CPU per request for one fio cell (from /proc/PID/stat around fio).
# Usage: scripts/measure/cpu_split.sh SERVER RW BS QD [server args...]
#   SERVER: a blkback tree (its .venv/bin/blkback serves a 1G memory export), nbdkit (its
#   memory plugin), or a study server script (scripts/measure/*_server.py, run by this
#   tree's .venv/bin/python with the socket path; its environment passes through).
#   e.g.  scripts/measure/cpu_split.sh /work/main randread 4k 1 --poll-us 0
#         scripts/measure/cpu_split.sh nbdkit randread 4k 1 --threads 1
#         SPIN=1 scripts/measure/cpu_split.sh scripts/measure/floor_server.py randwrite 4k 1
# Prints IOPS and user/sys/total microseconds per request; RT=SECONDS sets fio's runtime
# (default 5); PIN=CPU runs the server and the measured fio on that one CPU (taskset).
server=$1; rw=$2; bs=$3; qd=$4; shift 4
here=$(cd "$(dirname "$0")/../.." && pwd)
pin=()
[ -n "${PIN:-}" ] && pin=(taskset -c "$PIN")
d=$(mktemp -d /tmp/cpu_split.XXXX)
if [ "$server" = nbdkit ]; then
  "${pin[@]}" nbdkit -f -U "$d/s" "$@" memory 1G >"$d/log" 2>&1 & pid=$!
  uri="nbd+unix:///?socket=$d/s"
elif [[ "$server" == *.py ]]; then
  "${pin[@]}" "$here/.venv/bin/python" "$server" "$d/s" >"$d/log" 2>&1 & pid=$!
  uri="nbd+unix:///disk?socket=$d/s"
else
  "${pin[@]}" "$server/.venv/bin/blkback" serve -U "$d/s" --export disk=memory:1G --control "$d/c" "$@" >"$d/log" 2>&1 & pid=$!
  uri="nbd+unix:///disk?socket=$d/s"
fi
for _ in $(seq 50); do [ -S "$d/s" ] && break; sleep 0.1; done
fio --name=p --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=16 --size=1G --output-format=terse >/dev/null 2>&1
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
"${pin[@]}" fio --name=c --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --size=1G --time_based \
  --runtime="${RT:-5}" --output-format=json --output="$d/f.json" >/dev/null 2>&1
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
kill "$pid"; wait "$pid" 2>/dev/null
python3 - "$d/f.json" "$u0" "$s0" "$u1" "$s1" <<'PY'
import json, os, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
io = job["read"] if job["read"]["total_ios"] else job["write"]
u0, s0, u1, s1 = map(int, sys.argv[2:])
us_per_tick = 1e6 / os.sysconf("SC_CLK_TCK")
n = io["total_ios"]
user, system = (u1 - u0) * us_per_tick / n, (s1 - s0) * us_per_tick / n
print(f"{io['iops']:9.0f} IOPS  user {user:6.1f}  sys {system:6.1f}  total {user + system:6.1f} us/request")
PY
rm -rf "$d"
