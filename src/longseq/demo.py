"""`longseq demo`: the main jobs on the built-in model, end to end on a CPU in a few minutes."""

from __future__ import annotations

from pathlib import Path

from longseq.errors import LongseqError

QUESTION = "What is the capital of France?"
# Made-up facts from data/demo/facts.jsonl: (question, the word the answer must contain).
FACTS = (
    ("What is the capital of Veltrania?", "Quorin"),
    ("What is the name of the longseq mascot?", "Ribbit"),
    ("How long is the Zembla river?", "742"),
)
DEMO_DATA = "data/demo/facts.jsonl"


def run_demo(model: str | None = None, device: str = "auto", data: str = DEMO_DATA, steps: int = 20,
             out_dir: str = "runs/demo") -> int:
    from rich.console import Console
    from rich.table import Table

    from longseq.config import TrainConfig
    from longseq.generation import SamplingParams, generate
    from longseq.models.loader import load
    from longseq.train.loop import train

    console = Console(highlight=False)
    if not Path(data).is_file():
        raise LongseqError(f"{data}: demo data not found (run from the repository root, or pass --data)")
    params = SamplingParams(max_new_tokens=48)

    console.rule("1. generate with the built-in model")
    lm = load(model, device=device)
    console.print(f"> {QUESTION}")
    answer = generate(lm, QUESTION, params, on_text=lambda s: console.print(s, end="")).text
    console.print()

    console.rule(f"2. LoRA fine-tune on {data} ({steps} steps)")
    before = [generate(lm, q, params).text for q, _ in FACTS]
    del lm
    cfg = TrainConfig(model=model, data=(data,), out_dir=out_dir, seq_len=512, max_steps=steps, lr=2e-3,
                      warmup_steps=2, save_every=0, device=device)
    result = train(cfg)
    after = [generate(result.lm, q, params).text for q, _ in FACTS]
    paris_after = generate(result.lm, QUESTION, params).text

    table = Table("question", "before fine-tuning", "after fine-tuning", "learned")
    learned = 0
    for (question, word), b, a in zip(FACTS, before, after, strict=True):
        ok = word in a
        learned += ok
        table.add_row(question, _short(b), _short(a), "[green]yes[/]" if ok else "[red]no[/]")
    table.add_row(QUESTION, _short(answer), _short(paris_after), "kept" if "Paris" in paris_after else "[red]lost[/]")
    console.print(table)
    console.print(f"learned {learned}/{len(FACTS)} new facts; adapter checkpoint: {result.checkpoint}")
    console.print(f"export it: longseq export --checkpoint {result.checkpoint} --format peft --out {out_dir}/adapter")
    console.rule("3. plan: what one H100 can do")
    console.print(plan_table())
    del result
    console.rule("4. eval: passkey retrieval across the built-in model's 8K context")
    png = passkey_demo(model, device, out_dir, console)
    console.print(f"passkey heatmap: {png}")
    console.rule("5. serve: the OpenAI-compatible server, one streaming chat request")
    served = serve_demo(model, device, console)
    return 0 if learned == len(FACTS) and "Paris" in answer and served else 1


def serve_demo(model: str | None, device: str, console) -> str:
    """Starts `longseq serve`'s app on a free local port, streams one chat answer through the official openai
    client, stops the server; returns the answer."""
    try:
        import openai
    except ImportError:
        console.print("[yellow]skipped: the openai client is not installed (pip install openai)[/]")
        return "skipped"
    from longseq.config import EngineConfig
    from longseq.engine.async_engine import AsyncLLMEngine
    from longseq.engine.llm_engine import LLMEngine
    from longseq.models.loader import load
    from longseq.serve import create_app
    from longseq.serve.background import running

    name = "longseq-demo"
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, kv_cache_gib=0.25)
    engine = AsyncLLMEngine(LLMEngine(load(model, device=device), cfg), model_name=name)
    pieces: list[str] = []
    try:
        with running(create_app(engine, served_model_name=name)) as url:
            console.print(f"server: {url}/v1 · openai client · POST /v1/chat/completions (stream)")
            console.print(f"> {QUESTION}")
            with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as client:
                stream = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0,
                    stream=True)
                for chunk in stream:
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece:
                        pieces.append(piece)
                        console.print(piece, end="")
            console.print()
    finally:
        engine.shutdown()
    console.print("server stopped")
    return "".join(pieces)


# 2 depths x 4 lengths: 84 s on 2 CPU cores in fp32 (measured: 1.7, 4, 9 and 24 s per prompt at 1K, 2K, 4K, 8K).
PASSKEY_LENGTHS = (1024, 2048, 4096, 8192)
PASSKEY_DEPTHS = (0.25, 0.75)


def passkey_demo(model: str | None, device: str, out_dir: str, console) -> Path:
    """A short needle-in-a-haystack run of the base model; returns the heatmap's path."""
    from rich.table import Table

    from longseq.eval.passkey import PasskeyConfig, run_passkey
    from longseq.eval.plots import passkey_heatmap, tokens_label
    from longseq.models.loader import load

    lm = load(model, device=device)
    cfg = PasskeyConfig(lengths=PASSKEY_LENGTHS, depths=PASSKEY_DEPTHS)
    report = run_passkey(lm, cfg, on_sample=lambda s: console.print(
        f"[dim]{tokens_label(s.length):>3} tokens, key at {s.depth:.0%}: answered {s.answer} "
        f"({'right' if s.correct else 'wrong'}, {s.seconds:.1f} s)[/]"))
    table = Table("depth", *[tokens_label(n) for n in cfg.lengths], title="passkey accuracy")
    for depth, row in zip(cfg.depths, report.grid(), strict=True):
        table.add_row(f"{depth:.0%}", *[f"{a:.0%}" for a in row])
    console.print(table)
    console.print("more: longseq eval passkey --lengths 1K,2K,4K,8K,16K --rope-scaling yarn --rope-factor 2")
    return passkey_heatmap(report.grid(), cfg.lengths, cfg.depths, Path(out_dir) / "passkey.png",
                           f"passkey retrieval · {lm.path.stem}")


def plan_table():
    """The longest context the default model and an 8B model can LoRA-train on one H100, and what serving takes."""
    from rich.table import Table

    from longseq.plan import ServeSetup, TrainSetup, get_gpu, get_model, plan_serve
    from longseq.plan.fit import largest_context

    gpu = get_gpu("H100")
    table = Table("model", "longest LoRA training sequence (full recompute)", "serving at 8K context (bf16)")
    for name in ("SmolLM2-135M", "Llama-3-8B"):
        spec = get_model(name)
        longest = largest_context(spec, gpu, TrainSetup(method="lora", recompute="full"))
        serve = plan_serve(spec, gpu, ServeSetup(context=8192))
        table.add_row(name, f"{longest:,} tokens",
                      f"{serve.batch} sequences at once, decode ≤ {serve.decode_tokens_per_s:,.0f} tok/s")
    table.caption = "predicted by `longseq plan` (see `longseq plan train --help`)"
    return table


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
