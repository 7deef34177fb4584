"""Planning math in pure Python (no torch import): memory, FLOPs, time and cost of training and serving.

    from longseq.plan import get_model, get_gpu, TrainSetup, plan_train, fit_train, ServeSetup, plan_serve
    plan = plan_train(get_model("llama-3-8b"), get_gpu("H100"), TrainSetup(method="lora", seq_len=32768,
                      recompute="full"), tokens=1e9)
    plan.memory.total / 2**30, plan.step_time_s, plan.cost_usd
"""

from longseq.plan.activations import ActivationPeak, activation_peak, saved_bytes
from longseq.plan.fit import FitResult, SearchSpace, fit_train
from longseq.plan.hardware import GPU, GPUS, find_gpu, get_gpu
from longseq.plan.memory import TrainMemory, train_memory
from longseq.plan.models import PRESETS, ModelSpec, get_model
from longseq.plan.params import count_params, lora_params
from longseq.plan.serving import ServePlan, ServeSetup, kv_bytes_per_token, plan_serve
from longseq.plan.setup import Parallelism, TrainSetup, parallelism_for, setup_for
from longseq.plan.training import TrainPlan, plan_train

__all__ = [
    "GPU", "GPUS", "PRESETS", "ActivationPeak", "FitResult", "ModelSpec", "Parallelism",
    "SearchSpace", "ServePlan", "ServeSetup", "TrainMemory", "TrainPlan", "TrainSetup", "activation_peak",
    "count_params", "find_gpu", "fit_train", "get_gpu", "get_model", "kv_bytes_per_token", "lora_params",
    "parallelism_for", "plan_serve", "plan_train", "saved_bytes", "setup_for", "train_memory",
]
