"""Time to first token of one long prompt alone (issue 21 item 3): Llama-3-8B shape, random bf16 weights."""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
import serve_workloads as sw
from serve_throughput import NullTokenizer
from longseq.config import EngineConfig
from longseq.engine.llm_engine import LLMEngine
from longseq.generation.sampling import SamplingParams
from longseq.models.loader import LoadedModel
t0 = time.monotonic()
args = sw.parse_args(["--quick", "--workloads", "long-context"])
mml = 131072 + 256
shape = sw.model_shape(args, mml)
model = sw.build_model(shape, torch.device("cuda"), torch.bfloat16)
engine = LLMEngine(LoadedModel(model, NullTokenizer(), Path("random")),
                   EngineConfig(max_num_seqs=8, max_num_batched_tokens=8192, max_model_len=mml, kv_cache_gib=0.5))
print("engine", round(time.monotonic() - t0, 1), flush=True)
res = {}
for n in (24576, 32768, 131072):
    ids = torch.randint(0, shape["vocab_size"], (n,)).tolist()
    torch.cuda.synchronize(); t = time.monotonic()
    rid = engine.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
    while engine.has_unfinished(): engine.step()
    torch.cuda.synchronize(); dt = time.monotonic() - t
    fl = 2 * sw.matmul_params(shape) * n + 2 * 32 * 4096 * n * n
    res[n] = {"ttft_s": round(dt, 2), "model_tflops": round(fl / dt / 1e12, 1)}
    print(n, res[n], flush=True)
    Path(os.environ["OUT"], "lone_long.json").write_text(json.dumps(res))
