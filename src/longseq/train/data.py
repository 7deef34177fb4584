"""Training data for `longseq train`: JSONL/text files -> tokenized documents with loss masks -> packed sequences.

Rows are `{"text": ...}` (continued pre-training, loss on every token) or `{"messages": [...]}` (chat, loss only on
assistant turns and the end-of-turn token after each). Documents are packed into fixed-length sequences with
per-document positions and ids, so attention and targets never cross a document boundary.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from longseq.errors import LongseqError, first_line

IGNORE = -100  # target of positions that carry no loss (torch's cross_entropy ignore_index)
SUFFIXES = (".jsonl", ".txt")
ROLES = ("system", "user", "assistant")
MAX_BAD_EXAMPLES = 20

OnBadRow = Literal["skip", "fail"]


@dataclass
class Document:
    input_ids: list[int]
    loss_mask: list[bool]  # per token: is this token a training target
    source: str  # "file:line"


@dataclass
class PackedSequence:
    input_ids: torch.Tensor  # (S,) int64
    targets: torch.Tensor  # (S,) int64, next token already shifted in; IGNORE where no loss
    positions: torch.Tensor  # (S,) int64, restart at 0 for each document
    doc_ids: torch.Tensor  # (S,) int64, 0, 1, 2, ... per document; padding has its own id


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S)
    targets: torch.Tensor  # (B, S)
    positions: torch.Tensor  # (B, S)
    doc_ids: torch.Tensor  # (B, S)
    epoch: int
    index: int  # global batch index across epochs: the data position to resume from


@dataclass
class BadRow:
    source: str  # "file:line"
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class BadRows:
    """Rows that could not be used: counts by kind of problem and the first few examples."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[BadRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, source: str, kind: str, reason: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append(BadRow(source, reason))

    def summary(self) -> str:
        if not self.total:
            return "no bad rows"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"{self.total} bad row(s) skipped: {kinds}"


@dataclass(frozen=True)
class DataStats:
    files: int
    documents: int
    tokens: int
    target_tokens: int  # before splitting long documents (a split loses the target at each cut)


class _BadRow(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind = kind


# ---- files -------------------------------------------------------------------------------------------------------


def resolve_files(paths: Sequence[str | Path], suffixes: Sequence[str] = SUFFIXES, kind: str = "data",
                  none_given: str = "no training data given") -> list[Path]:
    """The files named by `paths`: files as given, folders expanded to their files with `suffixes`, sorted."""
    names = ", ".join(suffixes[:-1]) + " or " + suffixes[-1]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise LongseqError(f"{path}: no such file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise LongseqError(f"{path}: folder holds no {names} files")
            files.extend(found)
        elif path.suffix.lower() in suffixes:
            files.append(path)
        else:
            raise LongseqError(f"{path}: unsupported {kind} file (expected {', '.join(suffixes)} or a folder)")
    if not files:
        raise LongseqError(none_given)
    return files


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise LongseqError(f"{path}: cannot read ({first_line(e)})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    # Split on b"\n" only: str.splitlines would also split on U+2028 and friends, legal unescaped inside JSON strings.
    data = _read_bytes(path).removeprefix(b"\xef\xbb\xbf")
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield number, line


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRow("not UTF-8", f"byte {e.start}") from None


# ---- rows -> documents ----------------------------------------------------------------------------------------------


def text_document(text: str, tokenizer: Any, source: str) -> Document:
    if not isinstance(text, str):
        raise _BadRow("text is not a string")
    if not text.strip():
        raise _BadRow("empty text")
    ids = list(tokenizer(text)["input_ids"])  # adds BOS where the tokenizer is configured to
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # documents end with EOS, so the model learns where text stops
    return Document(ids, [True] * len(ids), source)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _BadRow("malformed messages", "expected a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRow("malformed messages", f"message {i} is not {{role: str, content: str}}")
        if m["role"] not in ROLES:
            raise _BadRow("unknown role", f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("no assistant message")


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:
        raise _BadRow("chat template failed", first_line(e, 150)) from None
    if not isinstance(text, str):
        raise _BadRow("chat template failed", f"rendered a {type(text).__name__}, not a string")
    return text


def assistant_spans(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each assistant turn in it (content + end-of-turn).

    Works with any template that renders conversations append-only: the prompt up to an assistant turn (with the
    generation prompt) is a prefix of the conversation through that turn, which is a prefix of the whole chat.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # templates cannot render the empty prompt before it, so its span cannot be found
            raise _BadRow("assistant message first", "a chat must open with a system or user message")
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (through.startswith(prompt) and full.startswith(prompt) and full.startswith(through)):
            raise _BadRow("chat template not prefix-stable", f"assistant message {i} renders differently in context")
        # The newline after the end-of-turn token belongs to the layout, not to what the model must say.
        end = len(prompt) + len(through[len(prompt):].rstrip())
        spans.append((len(prompt), end))
    return full, spans


def chat_document(messages: Any, tokenizer: Any, source: str) -> Document:
    _check_messages(messages)
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)  # the template adds its own BOS
    ids = list(enc["input_ids"])
    # A token straddling a span edge (e.g. the header's "\n" merged with leading whitespace) is left out: never
    # train on the header.
    mask = [b > a and any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
    if not any(mask):
        raise _BadRow("no assistant tokens", "the rendered chat has no tokens inside an assistant turn")
    return Document(ids, mask, source)


def row_document(line: bytes, tokenizer: Any, source: str) -> Document:
    try:
        row = json.loads(_decode(line))
    except json.JSONDecodeError as e:
        raise _BadRow("invalid JSON", e.msg) from None
    if not isinstance(row, dict):
        raise _BadRow("not a JSON object", f"got {type(row).__name__}")
    if "text" in row and "messages" in row:
        raise _BadRow("both text and messages")
    if "text" in row:
        return text_document(row["text"], tokenizer, source)
    if "messages" in row:
        if getattr(tokenizer, "chat_template", None) is None:
            raise LongseqError(f"{source}: chat rows need a tokenizer with a chat template; this one has none")
        return chat_document(row["messages"], tokenizer, source)
    raise _BadRow("neither text nor messages")


def _file_documents(path: Path, tokenizer: Any, bad: BadRows, on_bad_row: OnBadRow) -> Iterator[Document]:
    if path.suffix.lower() == ".txt":
        rows: Iterator[tuple[int, bytes]] = iter([(1, _read_bytes(path).removeprefix(b"\xef\xbb\xbf"))])
    else:
        rows = _jsonl_rows(path)
    for number, raw in rows:
        source = f"{path}:{number}"
        try:
            if path.suffix.lower() == ".txt":
                yield text_document(_decode(raw), tokenizer, source)
            else:
                yield row_document(raw, tokenizer, source)
        except _BadRow as e:
            if on_bad_row == "fail":
                raise LongseqError(f"{source}: {e}") from None
            bad.add(source, e.kind, str(e))


def load_documents(
    paths: Sequence[str | Path], tokenizer: Any, on_bad_row: OnBadRow = "skip"
) -> tuple[list[Document], BadRows, int]:
    """Documents of every usable row, the report of bad ones, and the number of files read."""
    if on_bad_row not in ("skip", "fail"):
        raise LongseqError(f"on_bad_row must be 'skip' or 'fail', not {on_bad_row!r}")
    files = resolve_files(paths)
    bad = BadRows()
    docs = [doc for path in files for doc in _file_documents(path, tokenizer, bad, on_bad_row)]
    if not docs:
        detail = f"; {bad.summary()}, e.g. {bad.examples[0]}" if bad.total else ""
        raise LongseqError(f"no usable training documents in {', '.join(map(str, paths))}{detail}")
    return docs, bad, len(files)


# ---- packing ------------------------------------------------------------------------------------------------------


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
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64)
    return PackedSequence(as_tensor(ids), as_tensor(targets), as_tensor(positions), as_tensor(doc_ids))


def pack(documents: Sequence[Document], seq_len: int, seed: int, epoch: int, pad_id: int = 0) -> list[PackedSequence]:
    """Documents packed into sequences of exactly seq_len tokens (see pack_plan for the order)."""
    if seq_len < 2:
        raise LongseqError(f"sequence length must be at least 2, not {seq_len}")
    pieces = split_long(documents, seq_len)
    plan = pack_plan([len(p.input_ids) for p in pieces], seq_len, seed, epoch)
    return [_pack_one([pieces[i] for i in group], seq_len, pad_id) for group in plan]


def default_pad_id(tokenizer: Any) -> int:
    """Padding never gets loss, so any id works; prefer the tokenizer's own."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# ---- the dataset ----------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    documents: list[Document]
    bad_rows: BadRows = field(default_factory=BadRows)
    files: int = 0
    _pieces: dict[int, list[Document]] = field(default_factory=dict, init=False, repr=False)
    _cached: tuple[tuple[int, int, int, int], list[PackedSequence]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, paths: Sequence[str | Path], tokenizer: Any, on_bad_row: OnBadRow = "skip") -> TrainData:
        documents, bad, files = load_documents(paths, tokenizer, on_bad_row)
        return cls(documents, bad, files)

    @property
    def stats(self) -> DataStats:
        return DataStats(
            files=self.files,
            documents=len(self.documents),
            tokens=sum(len(d.input_ids) for d in self.documents),
            target_tokens=sum(sum(d.loss_mask[1:]) for d in self.documents),
        )

    def _pieces_for(self, seq_len: int) -> list[Document]:
        if seq_len not in self._pieces:
            self._pieces = {seq_len: split_long(self.documents, seq_len)}  # one length per run: keep only the last
        return self._pieces[seq_len]

    def _plan(self, seq_len: int, seed: int, epoch: int) -> list[list[int]]:
        return pack_plan([len(p.input_ids) for p in self._pieces_for(seq_len)], seq_len, seed, epoch)

    def sequences(self, seq_len: int, seed: int, epoch: int, pad_id: int) -> list[PackedSequence]:
        """The packed sequences of one epoch; the last epoch asked for is cached."""
        if seq_len < 2:
            raise LongseqError(f"sequence length must be at least 2, not {seq_len}")
        key = (seq_len, seed, epoch, pad_id)
        if self._cached is None or self._cached[0] != key:
            pieces = self._pieces_for(seq_len)
            plan = self._plan(seq_len, seed, epoch)
            self._cached = (key, [_pack_one([pieces[i] for i in group], seq_len, pad_id) for group in plan])
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
        if seq_len < 2:
            raise LongseqError(f"sequence length must be at least 2, not {seq_len}")
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


def _stack(seqs: Sequence[PackedSequence], epoch: int, index: int) -> Batch:
    return Batch(
        input_ids=torch.stack([s.input_ids for s in seqs]),
        targets=torch.stack([s.targets for s in seqs]),
        positions=torch.stack([s.positions for s in seqs]),
        doc_ids=torch.stack([s.doc_ids for s in seqs]),
        epoch=epoch,
        index=index,
    )
