"""`longseq eval`: passkey and needle retrieval, perplexity, BLEU / ROUGE and throughput, as a Python API and a CLI.

The names below load on first use, so that building the CLI parser (`longseq plan ...` included) never imports torch.
"""

import importlib

_WHERE = {
    "load_for_eval": "model", "PasskeyConfig": "passkey", "PasskeyReport": "passkey", "build_prompt": "passkey",
    "run_passkey": "passkey",
    "NeedleConfig": "needle", "run_needle": "needle", "PerplexityResult": "perplexity", "read_documents": "perplexity",
    "run_perplexity": "perplexity", "bleu": "textgen", "read_rows": "textgen", "rouge": "textgen",
    "run_textgen": "textgen", "ThroughputResult": "throughput", "run_throughput": "throughput",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'longseq.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"longseq.eval.{_WHERE[name]}"), name)
