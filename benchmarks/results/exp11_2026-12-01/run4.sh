#!/bin/bash
# full built-in eval split (57 windows) perplexity of last session's 3-bit GPTQ and AWQ+GPTQ artifacts
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/exp11
PY=/work/main/.venv/bin/python
cd /tmp/exp11
while pgrep -f "run3.sh" > /dev/null; do sleep 10; done
for M in "$@"; do
  date -u +"start full eval $M %FT%TZ" >> log4.txt
  nice -n 5 $PY -m memfit eval /tmp/awq11/$M --json > evalfull-$M.json 2>> log4.txt
  echo "rc $? $M" >> log4.txt
done
date -u +"done %FT%TZ" >> log4.txt
