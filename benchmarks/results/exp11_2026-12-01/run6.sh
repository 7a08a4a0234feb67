#!/bin/bash
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/exp11
PY=/work/main/.venv/bin/python
cd /tmp/exp11
until grep -q "^done" log5.txt 2>/dev/null; do sleep 15; done
date -u +"start compress w4g32sym-rtn %FT%TZ" >> log6.txt
nice -n 5 $PY -m memfit compress default --recipe /tmp/exp11/w4g32sym-rtn.yaml --format memfit --out /tmp/exp11/m-w4g32sym-rtn --overwrite --json > compress-w4g32sym-rtn.json 2>> log6.txt
echo "rc $?" >> log6.txt
./run2.sh /tmp/exp11/m-w4g32sym-rtn Q4_0 --exact
date -u +"done %FT%TZ" >> log6.txt
