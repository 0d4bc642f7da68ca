#!/bin/bash
# One fio cell against one server, with the server's CPU per request and passes per batch.
# Usage: scripts/measure/fio_ab.sh TREE|nbdkit RW BS QD [serve args...]
#   TREE: a worktree with .venv (its compiled build is used); nbdkit: nbdkit's memory plugin.
#   e.g.  scripts/measure/fio_ab.sh /work/wt-data write 1M 16 --param max_buffer_pages=0
# Prints MB/s, IOPS, server CPU (utime+stime of the whole server process over fio's run,
# divided by fio's requests) and, for blkback, requests per pass
# (from two `ctl stats` samples inside the run). RT=SECONDS sets fio's runtime (default 4);
# PRESSURE=1 reports memory pressure (`ctl pressure`) after the prefill (a squeezed run with
# --param buffer_squeeze_duration_ms=4294967295, as the bench's blkback-squeeze).
# Interleave A and B runs yourself: CPU per request is robust to load, throughput is not.
# usage: ab.sh TREE RW BS QD [serve args...]; prints MB/s and server CPU us/op
tree=$1; rw=$2; bs=$3; qd=$4; shift 4
d=$(mktemp -d /tmp/fio_ab.XXXX)
if [ $tree = nbdkit ]; then
nbdkit -f -U $d/s "$@" memory 1G >$d/log 2>&1 &
pid=$!
else
$tree/.venv/bin/blkback serve -U $d/s --export disk=memory:1G --control $d/c "$@" >$d/log 2>&1 &
pid=$!
fi
for i in $(seq 50); do [ -S $d/s ] && break; sleep 0.1; done
if [ $tree = nbdkit ]; then uri="nbd+unix:///?socket=$d/s"; else uri="nbd+unix:///disk?socket=$d/s"; fi
# prefill
fio --name=p --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=16 --size=512M --output-format=terse >/dev/null 2>&1
[ -n "$PRESSURE" ] && $tree/.venv/bin/blkback ctl --control $d/c pressure >/dev/null 2>&1
t0=$(awk '{print $14+$15}' /proc/$pid/stat)
fio --name=c --ioengine=nbd --uri="$uri" --rw=$rw --bs=$bs --iodepth=$qd --size=512M --time_based --runtime=${RT:-4} --output-format=json --output=$d/f.json >/dev/null 2>&1 &
fpid=$!
sleep 1; $tree/.venv/bin/blkback ctl --control $d/c stats --json > $d/st0.json 2>/dev/null
sleep $(( ${RT:-4} - 2 )); $tree/.venv/bin/blkback ctl --control $d/c stats --json > $d/st1.json 2>/dev/null
wait $fpid
t1=$(awk '{print $14+$15}' /proc/$pid/stat)
kill $pid; wait $pid 2>/dev/null
python3 - $d/f.json $t0 $t1 <<'PY'
import json,sys,os
j=json.load(open(sys.argv[1]))['jobs'][0]
t0,t1=float(sys.argv[2]),float(sys.argv[3])
io=j['read'] if j['read']['total_ios'] else j['write']
ops=io['total_ios']; mb=io['bw_bytes']/1e6
try:
    a,b=[json.load(open(os.path.dirname(sys.argv[1])+f'/st{i}.json'))['devices'][0]['rings'][0]['requests'] for i in (0,1)]
    n=lambda k: b[k]-a[k]
    extra=f" req/pass {(n('rd')+n('wr'))/max(1,n('passes')):.1f}"
except Exception as e: extra=''
print(f"{mb:8.0f} MB/s {io['iops']:9.0f} IOPS cpu {(t1-t0)/os.sysconf('SC_CLK_TCK')*1e6/ops:7.1f} us/op{extra}")
PY
rm -rf $d
