#!/bin/bash
# GGUF exports of the default model and their perplexity as transformers loads them (memfit eval
# of a .gguf converts it with transformers' GGUF loader), 4k windows.
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/awq11
PY=/work/main/.venv/bin/python
cd /tmp/awq11; mkdir -p gguf
for T in "$@"; do
  date -u +"start $T %FT%TZ" >> log-gguf.txt
  nice -n 5 $PY -m memfit export default --format gguf --type $T --out /tmp/awq11/gguf/default-$T.gguf --overwrite >> log-gguf.txt 2>&1
  echo "export $T rc $?" >> log-gguf.txt
  nice -n 5 $PY -m memfit eval /tmp/awq11/gguf/default-$T.gguf --ref default --max-tokens 4096 --json > eval-gguf-$T.json 2>> log-gguf.txt
  echo "eval $T rc $?" >> log-gguf.txt; date -u +"done $T %FT%TZ" >> log-gguf.txt
done
