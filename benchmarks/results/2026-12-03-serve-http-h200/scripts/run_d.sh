#!/bin/bash
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
export PYTHONPATH=/tmp/site:$PWD/src
LONGSEQ_TEST_CUDA=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/engine/test_quant_gpu.py -k int8 --durations=3 > $OUT/int8.log 2>&1
echo "== int8 rc=$?"; tail -8 $OUT/int8.log | cut -c1-300
LONGSEQ_TEST_CUDA=1 timeout 80 python3 -m pytest -q -p no:cacheprovider tests/engine/test_top_p_cut.py --durations=3 > $OUT/top_p.log 2>&1
echo "== top-p rc=$?"; tail -8 $OUT/top_p.log | cut -c1-300
