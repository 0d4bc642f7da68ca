#!/bin/sh
# The seed's overhead loop, run inside the VM on its ext4 file system:
#   ddloop.sh DIR RUNS COUNT
# = for i in {1..RUNS}; do dd if=/dev/zero of=file bs=4k count=COUNT; sync; done
# dd's own lines as it prints them, then after each run "ddsync T0 T1 T2": the guest's clock
# (coreutils' date, ns) before dd, after dd, after sync. dd and date are coreutils' (by full
# path: busybox's shell would run its own applets), so dd prints its lines as the seed's did.
cd "$1" || exit 1
i=0
while [ $i -lt "$2" ]; do
  t0=$(/usr/bin/date +%s.%N)
  /usr/bin/dd if=/dev/zero of=file bs=4k count="$3"
  t1=$(/usr/bin/date +%s.%N)
  sync
  t2=$(/usr/bin/date +%s.%N)
  echo "ddsync $t0 $t1 $t2"
  i=$((i + 1))
done
rm -f file
sync
