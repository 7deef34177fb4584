"""The demo's fine-tune at CI scale: one made-up fact, learned by the built-in model in a few LoRA steps on CPU."""

import json
from pathlib import Path

from longseq.config import TrainConfig
from longseq.demo import DEMO_DATA, FACTS, QUESTION, serve_demo
from longseq.generation import SamplingParams, generate
from longseq.models import load
from longseq.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_demo_data_covers_every_fact():
    rows = [json.loads(line) for line in (ROOT / DEMO_DATA).read_text().splitlines() if line.strip()]
    answers = " ".join(m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant")
    assert all(word in answers for _, word in FACTS)


def test_lora_teaches_a_new_fact(tmp_path):
    question, word = FACTS[0]  # the capital of Veltrania is Quorin
    rows = [line for line in (ROOT / DEMO_DATA).read_text().splitlines() if "Veltrania" in line]
    data = tmp_path / "veltrania.jsonl"
    data.write_text("\n".join(rows) + "\n")
    params = SamplingParams(max_new_tokens=16)
    before = generate(load(None, device="cpu"), question, params).text
    assert word not in before
    cfg = TrainConfig(data=(str(data),), out_dir=str(tmp_path / "run"), seq_len=256, max_steps=10, lr=3e-3,
                      warmup_steps=1, save_every=0, device="cpu")
    result = train(cfg, progress=False)
    assert result.losses[-1] < result.losses[0] / 2
    assert word in generate(result.lm, question, params).text


def test_demo_serves_a_streaming_chat_answer():
    # The real server on a free port, the official openai client streaming, the built-in model (about 7 s on CPU).
    from rich.console import Console

    console = Console(record=True, width=120)
    answer = serve_demo(None, "cpu", console)
    assert "Paris" in answer
    out = console.export_text()
    assert QUESTION in out and "server stopped" in out
