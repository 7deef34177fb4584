"""`longseq eval`: passkey retrieval, perplexity, BLEU / ROUGE and throughput, as a Python API and a CLI.

    from longseq.eval.model import load_for_eval
    from longseq.eval.passkey import PasskeyConfig, run_passkey
    lm = load_for_eval(overrides=ModelOverrides(rope_scaling="yarn", rope_factor=2))
    run_passkey(lm, PasskeyConfig(lengths=(8192, 16384))).grid()

Nothing is imported here, so that building the `longseq` parser (eval/cli.py) never loads torch.
"""
