"""Length-grouped batching (tasks.data.collate): every row exactly once per epoch, reproducible under a
seed, a new order each epoch, and less padding than random batching on real SST-2 lengths."""
from __future__ import annotations

import pytest
import torch

from tasks.config.schema import DataConfig
from tasks.data.collate import (
    LengthGroupedBatchSampler,
    SplitData,
    make_loader,
    padding_fraction,
    sequence_lengths,
)
from tasks.prepare import tokenize_splits

BATCH = 16
PAD = 0


@pytest.fixture(scope="module")
def sst2_rows(tiny_model_dir, sst2_dir) -> SplitData:
    """1,000 real SST-2 training rows through the tiny model's tokenizer. Each label is replaced
    by the row's position, so a batch says exactly which rows it holds (the collator passes
    labels through as given)."""
    cfg = DataConfig(source=str(sst2_dir), train_size=1000, eval_size=8, max_length=64)
    train = tokenize_splits(cfg, str(tiny_model_dir)).train
    return SplitData(train.input_ids, list(range(len(train))))


def epochs(loader, n: int) -> list[list[list[int]]]:
    """Row positions of every batch, for `n` passes over the loader."""
    return [[b["labels"].tolist() for b in loader] for _ in range(n)]


def test_every_row_exactly_once_per_epoch(sst2_rows):
    loader = make_loader(sst2_rows, BATCH, shuffle=True, seed=3, pad_token_id=PAD,
                         group_by_length=True)
    seen = epochs(loader, 2)
    for epoch in seen:
        rows = [r for batch in epoch for r in batch]
        assert sorted(rows) == list(range(len(sst2_rows)))  # none lost, none twice
        assert len(epoch) == len(loader) == -(-len(sst2_rows) // BATCH)
        assert all(len(batch) <= BATCH for batch in epoch)
        assert sum(len(batch) < BATCH for batch in epoch) <= 1  # one short batch at most
    assert seen[0] != seen[1]  # the generator moves on: each epoch has its own order


def test_batches_hold_the_rows_they_name(sst2_rows):
    loader = make_loader(sst2_rows, BATCH, shuffle=True, seed=0, pad_token_id=PAD,
                         group_by_length=True)
    for batch in loader:
        for ids, mask, row in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            want = sst2_rows.input_ids[int(row)]
            assert int(mask.sum()) == len(want)
            assert ids[: len(want)].tolist() == want


def test_same_seed_same_batches_other_seed_other_batches(sst2_rows):
    def run(seed):
        return epochs(make_loader(sst2_rows, BATCH, shuffle=True, seed=seed, pad_token_id=PAD,
                                  group_by_length=True), 2)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_grouping_reduces_padding_on_real_lengths(sst2_rows):
    def padding(group):
        return padding_fraction(make_loader(sst2_rows, BATCH, shuffle=True, seed=1,
                                            pad_token_id=PAD, group_by_length=group))

    random_pad, grouped_pad = padding(False), padding(True)
    assert random_pad > 0.3  # SST-2 sentences vary a lot in length
    assert grouped_pad < random_pad / 3, (random_pad, grouped_pad)


def test_longest_batch_is_not_always_first(sst2_rows):
    lengths = sequence_lengths(sst2_rows)
    firsts = []
    for seed in range(8):
        batches = list(LengthGroupedBatchSampler(lengths, BATCH, seed))
        longest = max(range(len(batches)), key=lambda i: max(lengths[j] for j in batches[i]))
        firsts.append(longest == 0)
    assert not all(firsts)


def test_default_loader_is_unchanged(sst2_rows):
    """Existing callers (group_by_length left out) get the plain seeded shuffle as before."""
    from torch.utils.data import DataLoader

    from tasks.data.collate import Collator

    before = DataLoader(sst2_rows, batch_size=BATCH, shuffle=True, collate_fn=Collator(PAD),
                        generator=torch.Generator().manual_seed(5))
    now = make_loader(sst2_rows, BATCH, shuffle=True, seed=5, pad_token_id=PAD)
    assert epochs(now, 2) == epochs(before, 2)


def test_padding_fraction_by_hand():
    # Lengths 1 and 3 in one batch: width 3, 2 of 6 positions are pads.
    data = SplitData([[5], [6, 7, 8]], [0, 1])
    assert padding_fraction(make_loader(data, 2, shuffle=False, seed=0, pad_token_id=PAD)) == 2 / 6
    assert padding_fraction(make_loader(data, 1, shuffle=False, seed=0, pad_token_id=PAD)) == 0.0


def test_grouping_is_for_training_only(sst2_rows):
    with pytest.raises(ValueError, match="training loaders"):
        make_loader(sst2_rows, BATCH, shuffle=False, seed=0, pad_token_id=PAD, group_by_length=True)


def test_padding_fraction_over_steps_spans_epochs():
    # Batches of one row never pad; two rows of lengths 1 and 3 pad 2 of 6 in every epoch.
    data = SplitData([[5], [6, 7, 8]], [0, 1])
    loader = make_loader(data, 2, shuffle=True, seed=0, pad_token_id=PAD, group_by_length=True)
    assert padding_fraction(loader, max_batches=5) == 2 / 6
    # It stops after max_batches: the third, all-pad batch here is never read.
    batches = [{"attention_mask": torch.ones(1, 2)}] * 2 + [{"attention_mask": torch.zeros(1, 2)}]
    assert padding_fraction(batches, max_batches=2) == 0.0
    assert padding_fraction(batches) == 1 / 3
    # Past the end of an epoch it goes on into the next: 3 batches of a 2-batch epoch.
    epoch = [{"attention_mask": torch.ones(1, 2)}, {"attention_mask": torch.zeros(1, 2)}]
    assert padding_fraction(epoch, max_batches=3) == 2 / 6
