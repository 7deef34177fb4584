"""Pipeline parallelism with torch.distributed.pipelining: each process holds a contiguous run of the decoder layers
(a stage; the embedding on the first, the final norm and LM head on the last), and a step's micro-batches flow
through the stages, activations forward and their gradients back, point to point.

Schedules (PyTorch's): `gpipe` (all forwards, then all backwards: every micro-batch's activations alive at once);
`1f1b` (PipeDream-Flush, Narayanan et al. 2021, arXiv 2104.04473: after a warm-up each process alternates one
forward and one backward, so at most `stages` micro-batches are in flight; bubble (p-1)/(m+p-1) of the step for p
stages and m micro-batches); `interleaved-1f1b` (the same paper's section 2.2: two stages per process, rank r
holding stages r and r+p, which halves the bubble for more point-to-point messages).

The step's micro-batches are its `--grad-accum` ones: the schedule runs them all, accumulating gradients, before
the optimizer steps. The modules keep their names (`model.layers.7...` stays layer 7 on whichever process holds
it), so checkpoints move between pipeline and other layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from longseq.errors import LongseqError
from longseq.train.loss import IGNORE, chunked_cross_entropy
from longseq.train.parallel.env import DistEnv

STAGES_PER_PROCESS = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2}


class StageLayers(nn.ModuleDict):
    """The decoder layers a process holds, under their indices in the whole model (so parameter names stay), in
    place of the model's ModuleList: iterating yields the layers, as the list does."""

    def __iter__(self):
        return iter(self.values())


def stage_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges of `num_stages` stages, as even as they come (the first ones one longer)."""
    if num_layers < num_stages:
        raise LongseqError(f"{num_stages} pipeline stages need at least as many decoder layers; the model has "
                           f"{num_layers}")
    size, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class Stage(nn.Module):
    """One stage's forward over the shared, split CausalLM: (token ids or hidden states, positions, doc ids) ->
    the next stage's inputs, or the last stage's final-norm hidden states. Positions and document ids travel
    with the activations (no gradient)."""

    def __init__(self, lm: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.lm, self.layers, self.first, self.last = lm, layers, first, last

    def forward(self, x: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor):
        lm = self.lm
        if self.first:
            x = lm.model.embed_tokens(x)  # (B, S, d)
        cos, sin = lm.rotary(positions, x.dtype)
        # As the trainer's step: a document mask only where a row holds several documents.
        docs = doc_ids if bool((positions[:, 1:] == 0).any()) else None
        runs = dict(zip(lm.model.layers.keys(), lm.layer_runs, strict=True))  # set_recompute may have changed
        for i in self.layers:
            x = runs[str(i)](lm.model.layers[str(i)], x, cos, sin, docs)
        if self.last:
            return lm.model.norm(x)
        return x, positions, doc_ids


class Pipeline(nn.Module):
    """This process's stages of a CausalLM (its parameters: what the stages hold) and the schedule that runs a
    step's micro-batches through them (`forward_backward`, in place of a forward)."""

    def __init__(self, lm: nn.Module, env: DistEnv, schedule: str, num_microbatches: int, loss_chunk: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        super().__init__()
        cfg = lm.config
        if cfg.tie_word_embeddings and lm.model.embed_tokens.weight.requires_grad:
            raise LongseqError("--pp with tied input and output embeddings that train (--method full, or "
                               "--lora-train-extra embed) is not supported yet: the first and last stages would "
                               "each update a copy")
        per_process = STAGES_PER_PROCESS[schedule]
        num_stages = env.pp * per_process
        ranges = stage_ranges(cfg.num_layers, num_stages)
        mine = [env.pp_rank + k * env.pp for k in range(per_process)]  # interleaved: r, r + p, ...
        self.first, self.last = 0 in mine, num_stages - 1 in mine
        _keep(lm, [i for s in mine for i in ranges[s]], self.first, self.last)
        group = env.group("pp")
        modules = [Stage(lm, ranges[s], s == 0, s == num_stages - 1) for s in mine]
        stages = [PipelineStage(m, s, num_stages, env.device, group=group) for m, s in zip(modules, mine, strict=True)]
        self.lm, self.loss_chunk, self.num_targets = lm, loss_chunk, 1
        # The loss of each micro-batch is its token losses over the whole step's targets: scale_grads off.
        kw = dict(n_microbatches=num_microbatches, loss_fn=self._loss, scale_grads=False)
        if schedule == "interleaved-1f1b":
            self.schedule = ScheduleInterleaved1F1B(stages, **kw)
        else:
            self.schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule](stages[0], **kw)

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(hidden.flatten(0, 1), self.lm.lm_head.weight, targets.flatten(),
                                     self.loss_chunk) / self.num_targets

    def forward_backward(self, micro_batches: list, precision, device: torch.device) -> float:
        """Forward and backward of every micro-batch of a step, gradients accumulated; returns the step's loss
        (mean over its target tokens) on the last stage, 0 elsewhere."""
        self.num_targets = max(1, sum(int((b.targets != IGNORE).sum()) for b in micro_batches))
        ids, positions, doc_ids, targets = (torch.cat([getattr(b, n) for b in micro_batches]).to(device)
                                            for n in ("input_ids", "positions", "doc_ids", "targets"))
        losses: list[torch.Tensor] = []
        with precision.autocast():
            args = (ids, positions, doc_ids) if self.first else ()
            self.schedule.step(*args, target=targets if self.last else None, losses=losses)
        return float(sum(loss.item() for loss in losses))


def _keep(lm: nn.Module, layers: list[int], first: bool, last: bool) -> None:
    """Drop from `lm` what this process's stages do not run: the other layers, the embedding (but on the first
    stage), the final norm and the LM head (but on the last). A frozen tied LM head stays on the last stage as a
    weight of its own (the same values as the first stage's embedding)."""
    lm.model.layers = StageLayers({str(i): lm.model.layers[i] for i in sorted(layers)})
    lm.set_recompute(lm.recompute, lm.offload_keep, min(lm.plain_layers, len(layers)))  # over the layers kept
    if not first:
        lm.model.embed_tokens = None
    if not last:
        lm.model.norm = None
        lm.lm_head = None
