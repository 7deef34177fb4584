#!/bin/bash
# issue 21 re-measure of the untimed changes (candidate top-p, one-upload index copies, thread HTTP default)
export PYTHONUNBUFFERED=1
COMMIT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt
LONGSEQ_TEST_CUDA=1 timeout 110 python3 -m pytest -q -p no:cacheprovider tests/engine/test_top_p_cut.py tests/engine/test_paged_attention.py tests/engine/test_quant_gpu.py tests/engine/test_core_client.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | tail -8 | cut -c1-300
timeout 50 python3 benchmarks/top_p_cut.py --out $OUT/top_p_cut.json > $OUT/top_p_cut.log 2>&1; echo "== top-p rc=$?"; tail -12 $OUT/top_p_cut.log
timeout 420 python3 benchmarks/serve_workloads.py --workloads greedy sampled-t07-p09 chat-mix chat-mix-http batch1 long-context --max-seconds 410 --commit $COMMIT --out $OUT/workloads > $OUT/workloads.log 2>&1
echo "== workloads rc=$?"; grep "^==\|start-up" $OUT/workloads.log | cut -c1-300; sed -n '/Against/,/Model FLOPs/p' $OUT/workloads/workloads.md | head -30
