#!/bin/bash
# memfit's per-channel int8 (preset w8) exported to Q8_0: a layout GGUF has no block for
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/exp11
PY=/work/main/.venv/bin/python
cd /tmp/exp11
date -u +"start w8 %FT%TZ" >> log9.txt
nice -n 5 $PY -m memfit compress default --recipe w8 --format memfit --out /tmp/exp11/m-w8 --overwrite --json > compress-w8.json 2>> log9.txt
echo "rc $?" >> log9.txt
nice -n 5 $PY -m memfit export /tmp/exp11/m-w8 --format gguf --type Q8_0 --out /tmp/exp11/gguf/m-w8-Q8_0.gguf --exact >> log9.txt 2>&1
echo "exact rc $?" >> log9.txt
./run2.sh /tmp/exp11/m-w8 Q8_0
date -u +"done %FT%TZ" >> log9.txt
