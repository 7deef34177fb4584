"""Chunked-prefill attention at long context: FA2 varlen (what the engine runs) vs cuDNN split in two (prefix without
mask + the chunk's own causal square) merged by log-sum-exp."""
import json, os, time, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from longseq.attention.varlen import Chunks, flash_varlen
dev = "cuda"
def timeit(f, n=5):
    f(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
def cudnn_lse(q, k, v, causal):  # q (1, H, S, D), k/v (1, H, T, D)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    return out[0], out[1]  # (1, H, S, D), (1, H, S) natural log
def split_chunk(q, k, v, P, expand):  # q (1, H, C, D) at positions P..P+C-1; k, v (1, Hk, P+C, D)
    if expand:
        g = q.shape[1] // k.shape[1]; k = k.repeat_interleave(g, 1); v = v.repeat_interleave(g, 1)
    oa, la = cudnn_lse(q, k[:, :, :P], v[:, :, :P], False)
    ob, lb = cudnn_lse(q, k[:, :, P:], v[:, :, P:], True)
    la, lb = la.float().reshape(oa.shape[:3]), lb.float().reshape(ob.shape[:3])
    m = torch.maximum(la, lb); wa, wb = (la - m).exp(), (lb - m).exp()
    return ((oa.float() * wa[..., None] + ob.float() * wb[..., None]) / (wa + wb)[..., None]).to(q.dtype)
res = {}
for C, T in [(8192, 32768), (8192, 131072)]:
    P = T - C
    q = torch.randn(1, 32, C, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, T, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    ch = Chunks(None, None, torch.tensor([0, C], dtype=torch.int32, device=dev), torch.tensor([0, T], dtype=torch.int32, device=dev), [C], [T])
    qp, kp, vp = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
    fa = lambda: flash_varlen(qp, kp, vp, ch, None)
    flops = 4 * 32 * 128 * (C * P + C * C / 2)
    r = {"fa2_varlen_tflops": flops / timeit(fa) / 1e12}
    ref = fa().transpose(0, 1).unsqueeze(0)
    for expand in (False, True):
        try:
            out = split_chunk(q, k, v, P, expand)
            r[f"cudnn_split_expand{int(expand)}_diff"] = (out.float() - ref.float()).abs().max().item()
            r[f"cudnn_split_expand{int(expand)}_tflops"] = flops / timeit(lambda: split_chunk(q, k, v, P, expand)) / 1e12
        except Exception as e:
            r[f"cudnn_split_expand{int(expand)}_error"] = str(e)[:300]
    # the whole prompt at once, causal, through SDPA's default choice and cuDNN (no chunking)
    if T <= 32768:
        qq = torch.randn(1, 32, T, 128, device=dev, dtype=torch.bfloat16)
        f2 = 4 * 32 * 128 * T * T / 2
        for name, be in [("sdpa_default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
            try:
                if be is None: t = timeit(lambda: F.scaled_dot_product_attention(qq, k, v, is_causal=True, enable_gqa=True))
                else:
                    with sdpa_kernel([be]): t = timeit(lambda: F.scaled_dot_product_attention(qq, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True))
                r[f"whole_{name}_tflops"] = f2 / t / 1e12
            except Exception as e: r[f"whole_{name}_error"] = str(e)[:200]
    res[f"{C}x{T}"] = r; print(C, T, json.dumps(r), flush=True)
    del q, k, v, qp, kp, vp; torch.cuda.empty_cache()
json.dump(res, open(os.environ["OUT"] + "/chunk_bench.json", "w"), indent=1)
