#!/bin/bash
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/exp11
PY=/work/main/.venv/bin/python
cd /tmp/exp11
until grep -q "compress w4g32-gguf rc" log1.txt; do sleep 15; done
./run2.sh /tmp/exp11/m-w4g32-gguf Q4_1 --exact
date -u +"start eval m-w4g32-gguf %FT%TZ" >> log5.txt
nice -n 5 $PY -m memfit eval /tmp/exp11/m-w4g32-gguf --ref default --max-tokens 4096 --json > eval-m-w4g32-gguf.json 2>> log5.txt
echo "rc $?" >> log5.txt
./llppl.sh gguf/m-w4g32-gguf-Q4_1.gguf
date -u +"start diag logits %FT%TZ" >> log5.txt
nice -n 5 $PY /work/wt/exp11/benchmarks/gguf_logits.py /tmp/exp11/m-w8g32-gguf /tmp/exp11/gguf/default-Q8_0-new.gguf > logits-w8g32-vs-defaultQ8_0.json 2>> log5.txt
date -u +"done %FT%TZ" >> log5.txt
