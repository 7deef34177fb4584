"""Documents packed into fixed-length sequences; positions restart and doc ids change at each document boundary, so
attention and targets never cross one."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from longseq.errors import LongseqError
from longseq.train.data.documents import Document

IGNORE = -100  # target of positions that carry no loss (torch's cross_entropy ignore_index)


@dataclass
class PackedSequence:
    input_ids: torch.Tensor  # (S,) int64
    targets: torch.Tensor  # (S,) int64, next token already shifted in; IGNORE where no loss
    positions: torch.Tensor  # (S,) int64, restart at 0 for each document
    doc_ids: torch.Tensor  # (S,) int64, 0, 1, 2, ... per document; padding has its own id


def check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise LongseqError(f"sequence length must be at least 2, not {seq_len}")


def pack(documents: Sequence[Document], seq_len: int, seed: int, epoch: int, pad_id: int = 0) -> list[PackedSequence]:
    """Documents packed into sequences of exactly seq_len tokens (see pack_plan for the order)."""
    check_seq_len(seq_len)
    return pack_pieces(split_long(documents, seq_len), seq_len, seed, epoch, pad_id)


def pack_pieces(pieces: Sequence[Document], seq_len: int, seed: int, epoch: int, pad_id: int) -> list[PackedSequence]:
    """`pack` for documents already cut by split_long, which a run does once and reuses for every epoch."""
    plan = pack_plan([len(p.input_ids) for p in pieces], seq_len, seed, epoch)
    return [_pack_one([pieces[i] for i in group], seq_len, pad_id) for group in plan]


def split_long(documents: Sequence[Document], seq_len: int) -> list[Document]:
    """Documents of at most seq_len tokens: longer ones cut into seq_len-sized pieces, each its own document."""
    pieces = []
    for doc in documents:
        if len(doc.input_ids) <= seq_len:
            pieces.append(doc)
            continue
        for start in range(0, len(doc.input_ids), seq_len):
            end = start + seq_len
            pieces.append(Document(doc.input_ids[start:end], doc.loss_mask[start:end], doc.source))
    return pieces


def pack_plan(lengths: Sequence[int], seq_len: int, seed: int, epoch: int) -> list[list[int]]:
    """Which documents (indices, each at most seq_len long) go into each sequence, in order.

    Shuffled per (seed, epoch), then filled in that order: a document that does not fit closes the sequence.
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    plan: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > seq_len:
            plan.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        plan.append(current)
    return plan


def default_pad_id(tokenizer: Any) -> int:
    """Padding never gets loss, so any id works; prefer the tokenizer's own."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _pack_one(docs: Sequence[Document], seq_len: int, pad_id: int) -> PackedSequence:
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    doc_ids: list[int] = []
    for d, doc in enumerate(docs):
        n = len(doc.input_ids)
        ids.extend(doc.input_ids)
        targets.extend(t if m else IGNORE for t, m in zip(doc.input_ids[1:], doc.loss_mask[1:], strict=True))
        targets.append(IGNORE)  # nothing to predict after a document's last token
        positions.extend(range(n))
        doc_ids.extend([d] * n)
    pad = seq_len - len(ids)
    ids.extend([pad_id] * pad)
    targets.extend([IGNORE] * pad)
    positions.extend(range(pad))
    doc_ids.extend([len(docs)] * pad)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64)  # (S,)
    return PackedSequence(as_tensor(ids), as_tensor(targets), as_tensor(positions), as_tensor(doc_ids))
