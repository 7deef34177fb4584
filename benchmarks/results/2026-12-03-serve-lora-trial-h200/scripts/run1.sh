export PYTHONUNBUFFERED=1
cd .s26
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
LONGSEQ_TEST_CUDA=1 PYTHONPATH=$PWD/src:$PWD/tests timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/models/test_lora_batched.py 2>&1 | tail -15
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/engine timeout 280 python3 .gpu-s26/gpu_check.py 2>&1 | tail -40
