#!/bin/bash
# llama.cpp perplexity of GGUF files, one thread, one after another, 20 min cap each
export OMP_NUM_THREADS=1
cd /tmp/exp11
for F in "$@"; do
  date -u +"start $F %FT%TZ" >> llppl.log
  /usr/bin/time -v timeout 1200 nice -n 5 /tmp/llamavenv/bin/python /work/wt/exp11/benchmarks/llama_cpp_ppl.py ppl $F eval_ids.json >> llppl.jsonl 2>> llppl.err
  echo "rc $? $F" >> llppl.log; date -u +"done $F %FT%TZ" >> llppl.log
done
