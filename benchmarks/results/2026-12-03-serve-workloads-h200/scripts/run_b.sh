export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
PYTHONPATH=/tmp/site:$PWD/src LONGSEQ_TEST_CUDA=1 timeout 170 python3 -m pytest -q -p no:cacheprovider tests/attention/test_varlen.py tests/attention/test_paged_decode_kernel.py tests/engine/test_paged_attention.py > $OUT/gpu_tests.log 2>&1
echo "== gpu tests rc=$?"; tail -4 $OUT/gpu_tests.log
PYTHONPATH=$PWD/src timeout 90 python3 .gpu/chunk_bench.py 2>&1 | tail -4 | cut -c1-900
PYTHONPATH=/tmp/site:$PWD/src timeout 400 python3 benchmarks/serve_workloads.py --quick --max-seconds 330 --commit $COMMIT --out $OUT/workloads > $OUT/workloads.log 2>&1
echo "== workloads rc=$?"; grep "^==\|start-up\|engine:" $OUT/workloads.log | cut -c1-420; sed -n '/Against/,/Model FLOPs/p' $OUT/workloads/workloads.md
