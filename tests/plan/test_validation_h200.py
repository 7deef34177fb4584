"""The planner against the H200 measurements in the repository (benchmarks/results/2026-12-03-train-liger-h200)."""

import json
from pathlib import Path

from longseq.plan.hardware import get_gpu
from longseq.plan.models import get_model
from longseq.plan.setup import TrainSetup
from longseq.plan.training import plan_train

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RUN = RESULTS / "2026-12-03-train-liger-h200" / "long_context.json"


def test_long_context_rows_within_2_percent():
    """benchmarks/long_context.py's longseq rows (Llama-3-8B shape, LoRA r16 on all seven linears, fused kernels,
    TokenLoss): untiled, tiled, keep_attention, full with plain layers, 8K-128K, each predicted with the techniques
    it ran, against torch.cuda.max_memory_allocated."""
    rows = [r for r in json.loads(RUN.read_text())["rows"] if r["side"] == "longseq"]
    assert len(rows) == 6 and {r["seq_len"] for r in rows} == {8192, 32768, 131072}
    lines = ["seq_len  recompute       tile  plain  measured GiB  predicted GiB  error"]
    for row in rows:
        setup = TrainSetup(method="lora", seq_len=row["seq_len"], recompute=row["recompute"], mlp_tile=row["tile"],
                           offload_keep=row["offload_keep"], plain_layers=row["plain_layers"],
                           attention_layers=row.get("attention_layers", 0), loss_chunk=1024, keep_hidden=False,
                           fused=row["fused"])
        predicted = plan_train(get_model("llama-3-8b"), get_gpu("H200"), setup).memory.allocated / 2**30
        error = predicted / row["peak_gib"] - 1
        lines.append(f"{row['seq_len']:>7}  {row['recompute']:<14}  {row['tile'] or '-':>5}  {row['plain_layers']:>5}  "
                     f"{row['peak_gib']:>12.2f}  {predicted:>13.2f}  {error:+6.2%}")
        assert abs(error) < 0.02, "\n".join(lines)
    # the reserve the planner adds (plan/memory.py ALLOCATOR_SLACK) covers what the allocator held beyond
    from longseq.plan.memory import ALLOCATOR_SLACK

    assert all(r["reserved_gib"] <= r["peak_gib"] * (1 + ALLOCATOR_SLACK) for r in rows)
