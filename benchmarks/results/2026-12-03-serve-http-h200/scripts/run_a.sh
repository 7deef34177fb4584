#!/bin/bash
# issue 21: GPU tests, top-p kernel timing, workloads (one H200 call). Usage: bash .gpu/run_a.sh COMMIT
export PYTHONUNBUFFERED=1
COMMIT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt
LONGSEQ_TEST_CUDA=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/attention/test_varlen.py tests/engine/test_top_p_cut.py tests/engine/test_core_client.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; tail -5 $OUT/gpu_tests.log | cut -c1-400
timeout 50 python3 benchmarks/top_p_cut.py --out $OUT/top_p_cut.json > $OUT/top_p_cut.log 2>&1; echo "== top-p rc=$?"; tail -8 $OUT/top_p_cut.log
timeout 420 python3 benchmarks/serve_workloads.py --workloads greedy sampled-t1 sampled-t07-p09 chat-mix long-context chat-mix-http --max-seconds 405 --commit $COMMIT --out $OUT/workloads > $OUT/workloads.log 2>&1
echo "== workloads rc=$?"; grep "^==\|start-up" $OUT/workloads.log | cut -c1-300; sed -n '/Against/,/Model FLOPs/p' $OUT/workloads/workloads.md | head -30
