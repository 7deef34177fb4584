#!/bin/bash
# issue 21: top-p fix re-measure; GIL switch interval experiment for the engine-thread HTTP server
export PYTHONUNBUFFERED=1
COMMIT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
export PYTHONPATH=/tmp/site:$PWD/src
LONGSEQ_TEST_CUDA=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/engine/test_top_p_cut.py tests/engine/test_paged_attention.py tests/engine/test_quant_gpu.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | tail -8 | cut -c1-300
timeout 50 python3 benchmarks/top_p_cut.py --out $OUT/top_p_cut.json > $OUT/top_p_cut.log 2>&1; echo "== top-p rc=$?"; tail -12 $OUT/top_p_cut.log
timeout 200 python3 benchmarks/serve_workloads.py --workloads greedy sampled-t07-p09 chat-mix chat-mix-http --max-seconds 195 --commit $COMMIT --out $OUT/w5ms > $OUT/w5ms.log 2>&1
echo "== default switch rc=$?"; grep "^==\|start-up" $OUT/w5ms.log | cut -c1-250; grep "Against" $OUT/w5ms/workloads.md
SWITCH=0.0005 PYTHONPATH=$PWD/.gpu/switch:$PYTHONPATH timeout 140 python3 benchmarks/serve_workloads.py --workloads chat-mix chat-mix-http --max-seconds 135 --commit $COMMIT --out $OUT/w05ms > $OUT/w05ms.log 2>&1
echo "== switch 0.5 ms rc=$?"; grep "^==\|start-up" $OUT/w05ms.log | cut -c1-250; grep "Against" $OUT/w05ms/workloads.md
