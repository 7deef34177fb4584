"""Attention variant and RoPE scaling to apply to a loaded model: flags and YAML keys of `longseq train` and
`longseq eval` (models/overrides.py applies them)."""

from __future__ import annotations

from dataclasses import dataclass

from longseq.config.flags import flag
from longseq.config.model import ATTENTION_KERNELS, ATTENTION_VARIANTS, MEMORY_PLACEMENTS
from longseq.errors import LongseqError

OVERRIDE_ATTENTION = ("causal", "sliding", *ATTENTION_VARIANTS[1:])
ROPE_SCALINGS = ("none", "linear", "dynamic", "ntk", "yarn")  # ntk: dynamic NTK


@dataclass
class ModelOverrides:
    """Attention variant and RoPE scaling applied to a loaded model (`longseq.models.overrides.apply_overrides`);
    flags and YAML keys of `longseq train` and `longseq eval`. Unset (None) keeps what the model has."""

    attention: str | None = flag("causal | sliding | streaming | dilated | block_sparse | memory", default=None)
    window: int | None = flag("sliding / streaming / memory: recent tokens a query sees, itself included (memory "
                              "without it: 4096)", default=None)
    sink_tokens: int | None = flag("streaming / memory: first tokens always kept, the attention sinks (None: 4)",
                                   default=None)
    segment_lengths: tuple[int, ...] = flag("dilated: segment length of each pattern (none given: 2048)", default=())
    dilation_rates: tuple[int, ...] = flag("dilated: dilation rate of each pattern (none given: 1 each)", default=())
    block_size: int | None = flag("block_sparse / memory: tokens per block (None: 64)", default=None)
    local_blocks: int | None = flag("block_sparse: blocks seen up to a query's own (None: 4)", default=None)
    global_blocks: int | None = flag("block_sparse: first blocks every query sees (None: 1)", default=None)
    retrieved_blocks: int | None = flag("memory: past blocks each query block retrieves (None: 16)", default=None)
    memory_placement: str | None = flag("memory: gpu | host: where the blocks beyond the window live (None: gpu)",
                                        default=None)
    alibi: bool = flag("ALiBi distance bias instead of RoPE (for models trained with it)", default=False)
    attention_chunk: int | None = flag("exact attention in tiles of this many tokens; 0: off", default=None)
    attention_kernel: str | None = flag("auto | sdpa | fa4: causal attention kernel (auto: FlashAttention-4 where "
                                        "flash-attn-4 is installed on a Hopper/Blackwell GPU, else SDPA)",
                                        default=None)
    rope_scaling: str | None = flag("none | linear | dynamic (= ntk) | yarn: RoPE context extension", default=None)
    rope_factor: float | None = flag("RoPE scaling factor: the context multiple", default=None)
    max_seq_len: int | None = flag("context limit (default: the native context x rope factor)", default=None)

    def __post_init__(self):
        for name in ("segment_lengths", "dilation_rates"):  # "2048,4096", [2048, 4096] and (2048,) alike
            value = getattr(self, name)
            items = value.split(",") if isinstance(value, str) else [x for v in value for x in str(v).split(",")]
            try:
                setattr(self, name, tuple(int(x) for x in items if x.strip()))
            except ValueError:
                raise LongseqError(f"{name} takes integers; got {value!r}") from None
        if self.attention is not None and self.attention not in OVERRIDE_ATTENTION:
            raise LongseqError(f"attention must be one of {', '.join(OVERRIDE_ATTENTION)}; got {self.attention!r}")
        if self.attention_kernel is not None and self.attention_kernel not in ATTENTION_KERNELS:
            raise LongseqError(f"attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}; "
                               f"got {self.attention_kernel!r}")
        if self.memory_placement is not None and self.memory_placement not in MEMORY_PLACEMENTS:
            raise LongseqError(f"memory_placement must be one of {', '.join(MEMORY_PLACEMENTS)}; "
                               f"got {self.memory_placement!r}")
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALINGS:
            raise LongseqError(f"rope_scaling must be one of {', '.join(ROPE_SCALINGS)}; got {self.rope_scaling!r}")
        for name in ("window", "block_size", "local_blocks", "max_seq_len"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise LongseqError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("sink_tokens", "global_blocks", "attention_chunk", "retrieved_blocks"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise LongseqError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rope_factor is not None and not 1 <= self.rope_factor < float("inf"):
            raise LongseqError(f"rope_factor must be a finite number >= 1, got {self.rope_factor}")
        if self.attention in ("sliding", "streaming") and self.window is None:
            raise LongseqError(f"--attention {self.attention} needs --window N")
