#!/bin/bash
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/exp11
PY=/work/main/.venv/bin/python
cd /tmp/exp11
while pgrep -f "run2.sh /tmp/exp11/m-w8g32-gguf" > /dev/null; do sleep 10; done
date -u +"start eval m-w8g32-gguf %FT%TZ" >> log3.txt
nice -n 5 $PY -m memfit eval /tmp/exp11/m-w8g32-gguf --ref default --max-tokens 4096 --json > eval-m-w8g32-gguf.json 2>> log3.txt
echo "rc $?" >> log3.txt
./llppl.sh gguf/m-w8g32-gguf-Q8_0.gguf
date -u +"start export default Q8_0 %FT%TZ" >> log3.txt
nice -n 5 $PY -m memfit export default --format gguf --type Q8_0 --out /tmp/exp11/gguf/default-Q8_0-new.gguf --overwrite >> log3.txt 2>&1
cmp /tmp/exp11/gguf/default-Q8_0-new.gguf /tmp/awq11/gguf/default-Q8_0.gguf >> log3.txt 2>&1; echo "cmp rc $?" >> log3.txt
nice -n 5 $PY /work/wt/exp11/benchmarks/gguf_logits.py default /tmp/exp11/gguf/default-Q8_0-new.gguf > logits-default-Q8_0-new.json 2>> log3.txt
date -u +"done %FT%TZ" >> log3.txt
