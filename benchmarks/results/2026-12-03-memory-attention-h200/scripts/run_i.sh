#!/bin/bash
# issue 24 (memory attention: engine GPU tests, batched-path check, serving speed, eval grid) + issue 27's int4 fix
export PYTHONUNBUFFERED=1
COMMIT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
export PYTHONPATH=/tmp/site:$PWD/src
LONGSEQ_TEST_CUDA=1 timeout 75 python3 -m pytest -q -p no:cacheprovider --tb=line tests/engine/test_memory_engine_gpu.py tests/models/quant/test_int4_tinygemm.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | tail -8 | cut -c1-300
timeout 45 python3 benchmarks/memory_attention_check.py --device cuda --tokens 16K > $OUT/check.log 2>&1; echo "== check rc=$?"; tail -5 $OUT/check.log | cut -c1-300
timeout 100 python3 benchmarks/serve_memory.py --lengths 32K,128K --full-lengths 32K,128K --new-tokens 32 --out $OUT/serve_memory.json > $OUT/serve_memory.log 2>&1; echo "== serve_memory rc=$?"; tail -12 $OUT/serve_memory.log | cut -c1-300
timeout 185 python3 benchmarks/memory_attention.py --preset h200 --max-seconds 170 --out /tmp/ma > $OUT/ma.log 2>&1; echo "== memory_attention rc=$?"; tail -25 $OUT/ma.log | cut -c1-300
cp /tmp/ma/results.json $OUT/ma_results.json; cp /tmp/ma/table.md $OUT/ma_table.md
