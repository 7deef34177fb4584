export PYTHONUNBUFFERED=1
for t in old s20; do
  cd $ROOT/.gpu/$t && PYTHONPATH=$PWD/src timeout 220 python3 benchmarks/long_context.py --runs longseq:32768 --timeout 210 --out $OUT/lc_$t.json > $OUT/lc_$t.log 2>&1
  echo "== $t rc=$?"; tail -2 $OUT/lc_$t.log | cut -c1-700
done
cd $ROOT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1 || echo "wheels failed"
PYTHONPATH=/tmp/site:$ROOT/src timeout 320 python3 benchmarks/serve_workloads.py --quick --max-seconds 300 --commit $COMMIT --out $OUT/workloads > $OUT/workloads.log 2>&1
echo "== workloads rc=$?"; tail -25 $OUT/workloads.log | cut -c1-300
