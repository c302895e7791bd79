#!/bin/bash
# before (main at f3463ff, extracted to /tmp/h10_base) vs after (this branch), back to back
cd /work/wt-10
export DS_ACCELERATOR=cpu
for round in 1 2; do for w in 1 2; do for tree in /tmp/h10_base /work/wt-10; do
  load=$(cut -d' ' -f1 /proc/loadavg)
  res=$( { /usr/bin/time -f "CPU %U %S" .venv/bin/python $tree/benchmarks/data_scale.py prepare /tmp/dsbench 5000 --workers $w; } 2>&1 )
  echo "round=$round tree=$tree workers=$w load=$load $(echo "$res" | tr '\n' ' ')"
done; done; done
