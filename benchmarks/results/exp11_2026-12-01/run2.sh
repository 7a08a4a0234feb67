#!/bin/bash
# export a memfit folder to GGUF (exact), then logits vs memfit's, then perplexity of both on 4k windows
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/exp11
PY=/work/main/.venv/bin/python
cd /tmp/exp11
SRC=$1; T=$2; shift 2
N=$(basename $SRC)-$T
date -u +"start export $N %FT%TZ" >> log2.txt
/usr/bin/time -f "%e s %M KB" nice -n 5 $PY -m memfit export $SRC --format gguf --type $T --out /tmp/exp11/gguf/$N.gguf --overwrite "$@" >> log2.txt 2>&1
echo "export $N rc $?" >> log2.txt
date -u +"start logits $N %FT%TZ" >> log2.txt
nice -n 5 $PY /work/wt/exp11/benchmarks/gguf_logits.py $SRC /tmp/exp11/gguf/$N.gguf > logits-$N.json 2>> log2.txt
echo "logits $N rc $?" >> log2.txt
date -u +"start eval $N %FT%TZ" >> log2.txt
nice -n 5 $PY -m memfit eval /tmp/exp11/gguf/$N.gguf --ref $SRC --max-tokens 4096 --json > eval-gguf-$N.json 2>> log2.txt
echo "eval gguf $N rc $?" >> log2.txt
date -u +"done $N %FT%TZ" >> log2.txt
