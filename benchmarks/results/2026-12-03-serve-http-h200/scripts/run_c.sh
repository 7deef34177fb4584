#!/bin/bash
# GPU tests of the merged work; issue 21 workloads (thread-mode HTTP in the same run), then process-mode HTTP profiled
export PYTHONUNBUFFERED=1
COMMIT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
export PYTHONPATH=/tmp/site:$PWD/src
LONGSEQ_TEST_CUDA=1 timeout 130 python3 -m pytest -q -p no:cacheprovider tests/engine/test_top_p_cut.py tests/engine/test_quant_gpu.py tests/engine/test_core_client.py tests/engine/test_core_client_lora.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | tail -8 | cut -c1-300
timeout 200 python3 benchmarks/serve_workloads.py --no-engine-process --workloads greedy sampled-t07-p09 chat-mix chat-mix-http --max-seconds 190 --commit $COMMIT --out $OUT/thread > $OUT/thread.log 2>&1
echo "== thread rc=$?"; grep "^==\|start-up" $OUT/thread.log | cut -c1-330; grep "Against" $OUT/thread/workloads.md
PYSAMPLE_EVERY=0.02 PYSAMPLE_DIR=/tmp/prof PYTHONPATH=$PWD/.gpu/prof:$PYTHONPATH timeout 150 python3 benchmarks/serve_workloads.py --workloads chat-mix-http --max-seconds 140 --commit $COMMIT --out $OUT/process > $OUT/process.log 2>&1
echo "== process rc=$?"; grep "^==\|start-up" $OUT/process.log | cut -c1-330
python3 -c "
import json,glob
json.dump([json.load(open(f)) for f in glob.glob('/tmp/prof/*.json')], open('$OUT/prof.json','w'))"
