#!/bin/bash
# The price of max_buffer_pages=0 for randread 4 KiB QD16 when a group of reads ends after
# G pages (BLKBACK_GROUP_PAGES; the default is 64): smaller groups reuse a drain's pages
# before the pass gives them back. Default and 0 side by side for each G, nbdkit --threads 1
# once a round. docs/data-path.md section 10 reads it.
# Usage: scripts/measure/read_groups_price.sh   (~1 min a round, 3 rounds)
cd "$(dirname "$0")/../.."
for r in 1 2 3; do
  echo "== round $r $(date -u +%H:%M:%S)"
  for g in 64 4 2 1; do
    for m in 1024 0; do
      printf 'G=%-3s mbp=%-5s %s\n' $g $m "$(BLKBACK_GROUP_PAGES=$g RT=4 scripts/measure/cpu_split.sh "$PWD" randread 4k 16 --pressure off --param max_buffer_pages=$m)"
    done
  done
  printf 'nbdkit-t1        %s\n' "$(RT=4 scripts/measure/cpu_split.sh nbdkit randread 4k 16 --threads 1)"
done
