"""TrainData: the documents of a run and the seeded, resumable stream of batches packed from them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longseq.config.train import DEFAULT_MAX_ROW_BYTES
from longseq.errors import LongseqError
from longseq.train.data.bad_rows import BadRows
from longseq.train.data.documents import Document, OnBadRow, load_documents
from longseq.train.data.packing import PackedSequence, check_seq_len, pack_pieces, pack_plan, split_long


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S)
    targets: torch.Tensor  # (B, S)
    positions: torch.Tensor  # (B, S)
    doc_ids: torch.Tensor  # (B, S)
    epoch: int
    index: int  # global batch index across epochs: the data position to resume from


@dataclass(frozen=True)
class DataStats:
    files: int
    documents: int
    tokens: int
    target_tokens: int  # before splitting long documents (a split loses the target at each cut)


@dataclass
class TrainData:
    documents: list[Document]
    bad_rows: BadRows = field(default_factory=BadRows)
    files: int = 0
    _pieces: dict[int, list[Document]] = field(default_factory=dict, init=False, repr=False)
    _cached: tuple[tuple[int, int, int, int], list[PackedSequence]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, paths: Sequence[str | Path], tokenizer: Any, on_bad_row: OnBadRow = "skip",
             max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> TrainData:
        documents, bad, files = load_documents(paths, tokenizer, on_bad_row, max_row_bytes)
        return cls(documents, bad, files)

    @property
    def stats(self) -> DataStats:
        return DataStats(
            files=self.files,
            documents=len(self.documents),
            tokens=sum(len(d.input_ids) for d in self.documents),
            target_tokens=sum(sum(d.loss_mask[1:]) for d in self.documents),
        )

    def sequences(self, seq_len: int, seed: int, epoch: int, pad_id: int) -> list[PackedSequence]:
        """The packed sequences of one epoch; the last epoch asked for is cached."""
        check_seq_len(seq_len)
        key = (seq_len, seed, epoch, pad_id)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, pack_pieces(self._pieces_for(seq_len), seq_len, seed, epoch, pad_id))
        return self._cached[1]

    def batches_per_epoch(self, seq_len: int, batch_size: int, seed: int, epoch: int) -> int:
        """Full batches in an epoch; the last incomplete batch of each epoch is dropped."""
        n = len(self._plan(seq_len, seed, epoch))
        if n < batch_size:
            raise LongseqError(
                f"the training data is too small for batch size {batch_size}: epoch {epoch} packs into "
                f"{n} sequence(s) of {seq_len} tokens; lower the batch size or the sequence length, or add data"
            )
        return n // batch_size

    def batches(self, seq_len: int, batch_size: int, seed: int, pad_id: int, start: int = 0) -> Iterator[Batch]:
        """Batches forever, epoch 0, 1, 2, ...; `start` skips that many batches (resume).

        Each epoch's last incomplete batch is dropped rather than padded with empty sequences or topped up from the
        next epoch, so every batch is full and every epoch starts from its own shuffle; the dropped sequences are
        different ones in each epoch. Skipping to `start` packs only document lengths, not tensors.
        """
        check_seq_len(seq_len)
        if batch_size < 1:
            raise LongseqError(f"batch size must be at least 1, not {batch_size}")
        if start < 0:
            raise LongseqError(f"start batch must be >= 0, not {start}")
        epoch, skip = 0, start
        per_epoch = self.batches_per_epoch(seq_len, batch_size, seed, epoch)  # raises now, not on first next()
        while skip >= per_epoch:
            skip -= per_epoch
            epoch += 1
            per_epoch = self.batches_per_epoch(seq_len, batch_size, seed, epoch)
        return self._iterate(seq_len, batch_size, seed, pad_id, epoch, skip, start)

    def _iterate(
        self, seq_len: int, batch_size: int, seed: int, pad_id: int, epoch: int, skip: int, index: int
    ) -> Iterator[Batch]:
        while True:
            seqs = self.sequences(seq_len, seed, epoch, pad_id)
            per_epoch = self.batches_per_epoch(seq_len, batch_size, seed, epoch)
            for b in range(skip, per_epoch):
                yield _stack(seqs[b * batch_size : (b + 1) * batch_size], epoch, index)
                index += 1
            epoch, skip = epoch + 1, 0

    def _pieces_for(self, seq_len: int) -> list[Document]:
        if seq_len not in self._pieces:
            self._pieces = {seq_len: split_long(self.documents, seq_len)}  # one length per run: keep only the last
        return self._pieces[seq_len]

    def _plan(self, seq_len: int, seed: int, epoch: int) -> list[list[int]]:
        # The plan alone (lengths, no tensors) is enough to count batches and to skip to a resume position.
        return pack_plan([len(p.input_ids) for p in self._pieces_for(seq_len)], seq_len, seed, epoch)


def _stack(seqs: Sequence[PackedSequence], epoch: int, index: int) -> Batch:
    return Batch(  # each (B, S)
        input_ids=torch.stack([s.input_ids for s in seqs]),
        targets=torch.stack([s.targets for s in seqs]),
        positions=torch.stack([s.positions for s in seqs]),
        doc_ids=torch.stack([s.doc_ids for s in seqs]),
        epoch=epoch,
        index=index,
    )
