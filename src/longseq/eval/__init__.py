"""`longseq eval`: passkey retrieval, perplexity, BLEU / ROUGE and throughput, as a Python API and a CLI."""

from longseq.eval.model import load_for_eval
from longseq.eval.passkey import PasskeyConfig, PasskeyReport, build_prompt, run_passkey
from longseq.eval.perplexity import PerplexityResult, read_documents, run_perplexity
from longseq.eval.textgen import bleu, read_rows, rouge, run_textgen
from longseq.eval.throughput import ThroughputResult, run_throughput

__all__ = ["PasskeyConfig", "PasskeyReport", "PerplexityResult", "ThroughputResult", "bleu", "build_prompt",
           "load_for_eval", "read_documents", "read_rows", "rouge", "run_passkey", "run_perplexity", "run_textgen",
           "run_throughput"]
