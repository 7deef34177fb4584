export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
PYTHONPATH=/tmp/site:$PWD/src LONGSEQ_TEST_CUDA=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/attention/test_varlen.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; tail -3 $OUT/gpu_tests.log
PYTHONPATH=/tmp/site:$PWD/src timeout 300 python3 benchmarks/serve_workloads.py --quick --workloads greedy sampled-t07-p09 chat-mix long-context --max-seconds 280 --commit $COMMIT --out $OUT/workloads > $OUT/workloads.log 2>&1
echo "== workloads rc=$?"; grep "^==\|start-up" $OUT/workloads.log | cut -c1-420; sed -n '/Against/,/Model FLOPs/p' $OUT/workloads/workloads.md
