"""Training data for `longseq train`: JSONL/text files -> tokenized documents with loss masks -> packed sequences.

Rows are `{"text": ...}` (continued pre-training, loss on every token) or `{"messages": [...]}` (chat, loss only on
assistant turns and the end-of-turn token after each). Documents are packed into fixed-length sequences with
per-document positions and ids, so attention and targets never cross a document boundary.

files.py      finding the .jsonl / .txt files and reading their rows
bad_rows.py   the error an unusable row raises and the report of rows skipped
chat.py       chat messages -> tokens, loss mask on assistant turns only
documents.py  rows -> Documents (token ids + loss mask)
packing.py    Documents -> fixed-length PackedSequences (the one packing path, for tests and TrainData alike)
batching.py   TrainData: the seeded, resumable stream of batches, epoch after epoch
"""

from longseq.train.data.bad_rows import BadRow, BadRows
from longseq.train.data.batching import Batch, DataStats, TrainData
from longseq.train.data.documents import Document, OnBadRow, load_documents
from longseq.train.data.files import SUFFIXES, resolve_files
from longseq.train.data.packing import IGNORE, PackedSequence, default_pad_id, pack, pack_plan, split_long

__all__ = [
    "IGNORE", "SUFFIXES", "BadRow", "BadRows", "Batch", "DataStats", "Document", "OnBadRow", "PackedSequence",
    "TrainData", "default_pad_id", "load_documents", "pack", "pack_plan", "resolve_files", "split_long",
]
