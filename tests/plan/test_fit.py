

def test_largest_context_is_the_boundary():
    from dataclasses import replace

    from longseq.plan import TrainSetup, get_gpu, get_model, plan_train
    from longseq.plan.fit import largest_context

    spec, gpu = get_model("Llama-3-8B"), get_gpu("H100")
    base = TrainSetup(method="lora", recompute="full")
    longest = largest_context(spec, gpu, base)
    assert longest % 1024 == 0 and 65536 < longest < 262144  # 64K measured at 46.8 GiB on an 80 GB H100
    assert plan_train(spec, gpu, replace(base, seq_len=longest)).fits
    assert not plan_train(spec, gpu, replace(base, seq_len=longest + 1024)).fits
    assert largest_context(get_model("Llama-3.1-405B"), gpu, base) == 0  # the weights alone do not fit
