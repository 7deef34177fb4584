#!/bin/bash
# issue 21 HTTP profile, issue 23 128K plan check, issue 26 multi-LoRA benchmark. Usage: bash .gpu/run_b.sh COMMIT
export PYTHONUNBUFFERED=1
COMMIT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl2/*.whl > /dev/null 2>&1 || echo "wheels failed"
export PYTHONPATH=/tmp/site:$PWD/src
PYSAMPLE_DIR=$OUT/prof PYTHONPATH=$PWD/.gpu/prof:$PYTHONPATH timeout 140 python3 benchmarks/serve_workloads.py --workloads chat-mix-http --max-seconds 130 --commit $COMMIT --out $OUT/http > $OUT/http.log 2>&1
echo "== http rc=$?"; grep "^==\|start-up" $OUT/http.log | cut -c1-400
mkdir -p $OUT/train
timeout 145 python3 benchmarks/long_context.py --timeout 135 --out $OUT/train/long_context_128k.json --runs longseq:131072 > $OUT/train/console.log 2>&1
echo "== train rc=$?"; tail -3 $OUT/train/console.log | cut -c1-600
timeout 295 python3 benchmarks/serve_lora.py --max-seconds 285 --commit $COMMIT --out $OUT/lora > $OUT/lora.log 2>&1
echo "== lora rc=$?"; tail -25 $OUT/lora.log | cut -c1-300
