#!/bin/sh
# The memory-pressure test's guest workload, run inside the VM:
#   bursts.sh PERIOD_CS BURST_MIB SECONDS PATTERN
# Every virtual disk gets one burst of BURST_MIB (one O_DIRECT write, all of it in flight at
# once, split by the guest's block layer into virtio requests) every PERIOD_CS centiseconds,
# the disks staggered evenly over the period, and idles in between. Prints one line per
# burst, "burst DISK START_CS END_CS" (the guest's /proc/uptime), then "bursts N".
# The data is PATTERN's first BURST_MIB (random bytes the host had the guest make before go,
# see vmguests.py), not /dev/zero: since Linux 6.12 the host swaps a zero-filled page out
# without I/O and without counting it in pswpout, so zeroes would hide the pools' swapping.
# Few forks per burst (one static busybox dd, one sleep): a TCG guest's CPU is slow.
period=$1
mib=$2
seconds=$3
pattern=$4
now_cs() { read -r up _ < /proc/uptime; now=${up%.*}${up#*.}; }
now_cs
start=$now
end=$((start + seconds * 100))
set -- /sys/block/vd*
n=$#
i=0
for sys in "$@"; do
  dev=/dev/${sys##*/}
  (
    next=$((start + period * i / n))
    off=0
    exec > /tmp/bursts.$i
    while [ $next -lt $end ]; do
      now_cs
      wait_cs=$((next - now))
      [ $wait_cs -gt 0 ] && sleep $((wait_cs / 100)).$((wait_cs % 100 / 10))$((wait_cs % 10))
      now_cs
      [ $now -ge $end ] && break
      t0=$now
      busybox dd if="$pattern" of="$dev" bs=${mib}M count=1 seek=$off oflag=direct 2>/dev/null
      now_cs
      echo "burst $i $t0 $now"
      off=$(((off + 1) % (256 / mib)))
      next=$((next + period))
      [ $next -lt $now ] && next=$((now + period))
    done
  ) &
  i=$((i + 1))
done
wait
cat /tmp/bursts.*
echo "bursts $(cat /tmp/bursts.* | wc -l)"
rm -f /tmp/bursts.*
