#!/bin/bash
export PYTHONUNBUFFERED=1
cp -r .gpu/gc/gguf .gpu/gc/gguf-*.dist-info /tmp/site/
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "import gguf" || exit 1
timeout 110 python3 benchmarks/memory_attention.py --preset h200 --max-seconds 100 --out /tmp/ma > $OUT/ma.log 2>&1; echo "== memory_attention rc=$?"; tail -22 $OUT/ma.log | cut -c1-300
cp /tmp/ma/results.json $OUT/ma_results.json; cp /tmp/ma/table.md $OUT/ma_table.md
timeout 50 python3 benchmarks/serve_memory.py --lengths 32K,128K --full-lengths 32K,128K --new-tokens 32 --out $OUT/serve_memory.json > $OUT/serve_memory.log 2>&1; echo "== serve_memory rc=$?"; tail -12 $OUT/serve_memory.log | cut -c1-300
