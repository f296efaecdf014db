"""Tokenizer loading and batching for classification data: a map-style split, a right-padding
collator, a seeded DataLoader (optionally length-grouped) and a padding measure. Kept apart from `tasks.prepare` so training code can import it
without the loading/validation machinery (and so neither file grows past a readable size)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from tasks.models.source import local_path


def load_tokenizer(name_or_path: str, revision: Optional[str] = None):
    """AutoTokenizer with a pad token: eos when the tokenizer has none (GPT-2)."""
    from transformers import AutoTokenizer  # imported here: heavy, and not needed to validate

    tokenizer = AutoTokenizer.from_pretrained(local_path(name_or_path), revision=revision)
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
    # Segment ids of a sentence pair (BERT-style tokenizers), aligned with input_ids; else None.
    token_type_ids: Optional[list[list[int]]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} sequences but {len(self.labels)} labels")
        if self.token_type_ids is not None and (
                [len(t) for t in self.token_type_ids] != [len(s) for s in self.input_ids]):
            raise ValueError("token_type_ids do not align with input_ids")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item

    def __repr__(self) -> str:
        return f"SplitData(rows={len(self)})"


@dataclass(frozen=True)
class Collator:
    """Right-pads a batch to its longest sequence.

    Right padding is what makes GPT-2 style pooling correct: the causal mask means a real token
    never sees the pads after it, positions of real tokens are the same as unbatched, and
    `GPT2ForSequenceClassification` pools the rightmost token that is not `pad_token_id`. The
    attention mask comes from the lengths, not from comparing ids, because with pad = eos an
    eos inside the text is a real token. (`tasks.prepare.tokenize_splits` guarantees no sequence
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
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "token_type_ids" in batch[0]:  # a pair: segment ids, padding in segment 0
            types = torch.zeros((len(batch), width), dtype=torch.long)
            for row, item in enumerate(batch):
                types[row, : len(item["token_type_ids"])] = torch.as_tensor(item["token_type_ids"])
            out["token_type_ids"] = types
        return out


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of rows of similar length, so right padding shrinks; every row once per epoch.

    As transformers' `LengthGroupedSampler`: shuffle all rows, cut the permutation into
    mega-batches of `mega_batch_mult × batch_size` rows, sort each by length (longest first) and
    cut it into batches. Unlike it, the order of the batches is shuffled too, so the longest
    batch does not always come first and a batch's length does not follow from its position in
    the epoch. One seeded generator, advanced every epoch, makes each epoch's order new and the
    whole sequence of epochs reproducible, as `DataLoader(shuffle=True, generator=...)` does."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int,
                 mega_batch_mult: Optional[int] = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        if mega_batch_mult is None:  # transformers' default: 50, or fewer to get 4 mega-batches
            mega_batch_mult = max(1, min(len(self.lengths) // (batch_size * 4), 50))
        self.mega_batch_size = mega_batch_mult * batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(perm), self.mega_batch_size):
            # A stable sort: equal lengths keep their random order.
            mega = sorted(perm[start:start + self.mega_batch_size],
                          key=lambda i: self.lengths[i], reverse=True)
            batches += [mega[j:j + self.batch_size] for j in range(0, len(mega), self.batch_size)]
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        return iter([batches[i] for i in order])


def sequence_lengths(split_data) -> list[int]:
    if isinstance(split_data, SplitData):
        return [len(ids) for ids in split_data.input_ids]
    return [len(split_data[i]["input_ids"]) for i in range(len(split_data))]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length, longest first (a stable sort: equal lengths
    keep file order). For scoring only: each row's prediction does not depend on its batch
    mates, so the caller puts the outputs back in file order (`file_order`)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def file_order(batches: list[list[int]]) -> list[int]:
    """The inverse permutation of the concatenated `batches`: outputs[file_order(b)] lists
    the outputs of rows 0, 1, 2, ... when outputs came batch after batch."""
    flat = [i for b in batches for i in b]
    inverse = [0] * len(flat)
    for position, row in enumerate(flat):
        inverse[row] = position
    return inverse


def make_loader(split_data: SplitData, batch_size: int, shuffle: bool, seed: int,
                pad_token_id: int, group_by_length: bool = False,
                batches: Optional[list[list[int]]] = None) -> DataLoader:
    """A DataLoader whose shuffle order depends only on `seed` (its own generator, so other
    users of the global torch RNG cannot shift it). No worker processes: batches are tiny lists
    of ints and workers would only add start-up time and nondeterminism.

    `group_by_length` (training only) batches rows of similar length together
    (`LengthGroupedBatchSampler`), still shuffled under `seed`. `batches` (scoring only)
    gives the batches' row indices outright, e.g. `length_sorted_batches`."""
    collate = Collator(pad_token_id)
    if batches is not None:
        if shuffle:
            raise ValueError("fixed batches are for scoring loaders (shuffle=False) only")
        return DataLoader(split_data, batch_sampler=batches, collate_fn=collate, num_workers=0)
    if group_by_length:
        if not shuffle:
            # Evaluation keeps file order: predictions are matched back to rows by position.
            raise ValueError("group_by_length is for training loaders (shuffle=True) only")
        sampler = LengthGroupedBatchSampler(sequence_lengths(split_data), batch_size, seed)
        # The loader draws its iterator's base seed from `generator` (else from the global
        # RNG, which would shift dropout): one generator for both keeps the run reproducible
        # and its state at an epoch start is all a resume needs.
        return DataLoader(split_data, batch_sampler=sampler, collate_fn=collate, num_workers=0,
                          generator=sampler.generator)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(split_data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate, num_workers=0)


def padding_fraction(loader, max_batches: Optional[int] = None) -> float:
    """Share of pad positions in `loader`'s batches (0 = no padding at all): one epoch, or the
    first `max_batches` batches, epoch after epoch, as a training loop of that many steps sees
    them.

    It iterates the loader, so a shuffled loader's generator moves on: measure on a loader
    built for the purpose (same seed), not on the one about to train."""
    pads = total = seen = 0
    while True:
        for batch in loader:
            mask = batch["attention_mask"]
            total += mask.numel()
            pads += mask.numel() - int(mask.sum())
            seen += 1
            if seen == max_batches:
                return pads / max(total, 1)
        if max_batches is None or seen == 0:
            return pads / max(total, 1)
