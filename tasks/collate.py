"""Tokenizer loading and batching for classification data: a map-style split, a right-padding
collator and a seeded DataLoader. Kept apart from `tasks.data` so training code can import it
without the loading/validation machinery (and so neither file grows past a readable size)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader


def load_tokenizer(name_or_path: str, revision: Optional[str] = None):
    """AutoTokenizer with a pad token: eos when the tokenizer has none (GPT-2)."""
    from transformers import AutoTokenizer  # imported here: heavy, and not needed to validate

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token; "
                             f"batches cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token  # what GPT-2 fine-tuning conventionally does
    return tokenizer


@dataclass
class SplitData:
    """One tokenised split, stored columnar (plain lists pickle small and fast for the Prefect
    result cache). Indexing yields the dict the `Collator` expects, so it is a map-style dataset."""

    input_ids: list[list[int]] = field(repr=False)
    labels: list[int] = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} sequences but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def __repr__(self) -> str:
        return f"SplitData(rows={len(self)})"


@dataclass(frozen=True)
class Collator:
    """Right-pads a batch to its longest sequence.

    Right padding is what makes GPT-2 style pooling correct: the causal mask means a real token
    never sees the pads after it, positions of real tokens are the same as unbatched, and
    `GPT2ForSequenceClassification` pools the rightmost token that is not `pad_token_id`. The
    attention mask comes from the lengths, not from comparing ids, because with pad = eos an
    eos inside the text is a real token. (`tasks.data.tokenize_splits` guarantees no sequence
    *ends* in the pad id, the one case where HF's pooling would pick the wrong token.)"""

    pad_token_id: int

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("Collator got an empty batch")
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            ids = item["input_ids"]
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = torch.as_tensor([int(item["labels"]) for item in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_loader(split_data: SplitData, batch_size: int, shuffle: bool, seed: int,
                pad_token_id: int) -> DataLoader:
    """A DataLoader whose shuffle order depends only on `seed` (its own generator, so other
    users of the global torch RNG cannot shift it). No worker processes: batches are tiny lists
    of ints and workers would only add start-up time and nondeterminism."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(split_data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=Collator(pad_token_id), num_workers=0)
