#!/bin/sh
# The memory-pressure test's guest workload, run inside the VM:
#   bursts.sh PERIOD_CS BURST_MIB SECONDS
# Every virtual disk gets one burst of BURST_MIB (one O_DIRECT write, all of it in flight at
# once, split by the guest's block layer into virtio requests) every PERIOD_CS centiseconds,
# the disks staggered evenly over the period, and idles in between. Prints one line per burst, "burst DISK START_CS END_CS" (the guest's
# /proc/uptime), then "bursts N".
period=$1
mib=$2
seconds=$3
uptime_cs() { read -r up _ < /proc/uptime; echo "${up%.*}${up#*.}"; }
sleep_cs() { [ "$1" -gt 0 ] && sleep "$(($1 / 100)).$(printf %02d $(($1 % 100)))"; }
set -- /sys/block/vd*
n=$#
start=$(uptime_cs)
end=$((start + seconds * 100))
i=0
for sys in "$@"; do
  dev=/dev/${sys##*/}
  (
    next=$((start + period * i / n))
    off=0
    while :; do
      now=$(uptime_cs)
      sleep_cs $((next - now))
      t0=$(uptime_cs)
      [ "$t0" -ge "$end" ] && break
      dd if=/dev/zero of="$dev" bs=${mib}M count=1 seek=$off oflag=direct 2>/dev/null
      t1=$(uptime_cs)
      echo "burst $i $t0 $t1" >> /tmp/bursts.$i
      off=$(((off + 1) % (256 / mib)))
      next=$((next + period))
      [ "$next" -lt "$t1" ] && next=$((t1 + period))
    done
  ) &
  i=$((i + 1))
done
wait
cat /tmp/bursts.* 2>/dev/null
echo "bursts $(cat /tmp/bursts.* 2>/dev/null | wc -l)"
rm -f /tmp/bursts.*
