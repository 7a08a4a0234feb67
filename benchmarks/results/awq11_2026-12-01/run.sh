#!/bin/bash
# usage: run.sh PRESET [extra compress args]  -> compress + 4k eval, json to /tmp/awq11/
P=$1; shift
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/awq11
PY=/work/main/.venv/bin/python
cd /tmp/awq11
date -u +"start %FT%TZ" > log-$P.txt
nice -n 5 $PY -m memfit compress --recipe $P --out /tmp/awq11/m-$P --overwrite --json "$@" > compress-$P.json 2>> log-$P.txt
echo "compress rc $?" >> log-$P.txt; date -u +"compressed %FT%TZ" >> log-$P.txt
nice -n 5 $PY -m memfit eval /tmp/awq11/m-$P --ref default --max-tokens 4096 --json > eval-$P.json 2>> log-$P.txt
echo "eval rc $?" >> log-$P.txt; date -u +"done %FT%TZ" >> log-$P.txt
