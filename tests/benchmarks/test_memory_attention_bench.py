"""benchmarks/memory_attention.py --tiny: every path of the memory-attention benchmark (calibration, plan, retrieval,
perplexity, decode speed, not-run cells, results.json / table.md / heatmaps) on a tiny random model, in seconds.
Run as a script, as a user runs it (tests never import from benchmarks/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_every_output(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_attention.py"), "--tiny", "--device", "cpu",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    lengths = [str(n) for n in results["settings"]["lengths"]]
    for config in ("memory", "none", "ntk", "yarn"):
        for task in ("passkey", "needle"):
            cells = results["retrieval"][config][task]
            assert set(cells) == set(lengths)
            for n in lengths:
                assert "accuracy" in cells[n] or cells[n]["not_run"].startswith("not run: past --full-max")
        assert "ppl" in results["ppl"][config]["512"]
        assert (tmp_path / "heatmaps" / f"{config}-passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert all("accuracy" in results["retrieval"]["memory"][t][n] for t in ("passkey", "needle") for n in lengths)
    assert "not_run" in results["retrieval"]["none"]["passkey"]["1024"]  # past --full-max: recorded, not run
    for mode in ("full", "memory"):
        assert all(results["speed"][mode][str(n)]["decode_tok_s"] > 0 for n in results["settings"]["speed_lengths"])
    assert results["plan"] and all(p["estimate_s"] >= 0 for p in results["plan"])
    table = (tmp_path / "table.md").read_text()
    assert "## Retrieval accuracy" in table and "## Decode speed and memory" in table and "not run" in table
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes left no temporary file behind
