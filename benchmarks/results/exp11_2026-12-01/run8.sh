#!/bin/bash
cd /tmp/exp11
until grep -q "^done" log7.txt 2>/dev/null; do sleep 15; done
./llppl.sh gguf/m-w4g32sym-rtn-Q4_0.gguf
