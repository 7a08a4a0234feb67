#!/bin/bash
# compress default with the GGUF-exact presets, export each to GGUF, compare logits
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/exp11
PY=/work/main/.venv/bin/python
cd /tmp/exp11
for R in "$@"; do
  date -u +"start $R %FT%TZ" >> log1.txt
  /usr/bin/time -f "%e s %M KB" nice -n 5 $PY -m memfit compress default --recipe $R --format memfit --out /tmp/exp11/m-$R --overwrite --json > compress-$R.json 2>> log1.txt
  echo "compress $R rc $?" >> log1.txt
done
