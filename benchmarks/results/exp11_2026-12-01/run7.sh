#!/bin/bash
# cost of gguf_exact's shortened scales: RTN int4 g32 asymmetric with and without it
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/exp11
PY=/work/main/.venv/bin/python
cd /tmp/exp11
until grep -q "^done" log6.txt 2>/dev/null; do sleep 15; done
for R in w4g32-rtn w4g32-rtn-exact; do
  date -u +"start $R %FT%TZ" >> log7.txt
  nice -n 5 $PY -m memfit compress default --recipe /tmp/exp11/$R.yaml --format memfit --out /tmp/exp11/m-$R --overwrite --json > compress-$R.json 2>> log7.txt
  nice -n 5 $PY -m memfit eval /tmp/exp11/m-$R --ref default --max-tokens 4096 --json > eval-m-$R.json 2>> log7.txt
  echo "rc $? $R" >> log7.txt
done
date -u +"done %FT%TZ" >> log7.txt
