set -x
cd /work/wt/awq11b
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/awq11b
date -u
/work/main/.venv/bin/python -m memfit compress default --recipe w4g64-awq --out /tmp/awq11b/m/w4g64-awq-r3b --overwrite --json > /tmp/awq11b/w4g64-awq-r3b.compress.json
date -u
/work/main/.venv/bin/python -m memfit eval /tmp/awq11b/m/w4g64-awq-r3b --ref default --max-tokens 4096 --json > /tmp/awq11b/w4g64-awq-r3b.eval4k.json
date -u
