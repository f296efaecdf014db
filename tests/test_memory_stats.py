"""Memory beyond the peak (issue #18 item 5): the average and 99th percentile over the training
steps, one sample after each optimiser step, as peft's method_comparison records them.

The oracle is a planted allocation pattern whose figures are computed by hand below, and the
real training loop on a tiny real transformers model (one sample per optimiser step)."""
from __future__ import annotations

import pytest
import torch

from tasks.common import names
from tasks.training.memory import PeakMemory, step_sample

MB = 2**20


def _hold(mb: int) -> torch.Tensor:
    return torch.ones(mb * MB // 4)  # written, so every page is resident


def test_planted_pattern_average_and_p99():
    """Ten steps: 128 MB held through steps 1-3 and freed during step 4 (so step 4 saw it),
    nothing in steps 5-8, 128 MB in step 9, 256 MB in step 10 (the 128 freed first).
    Samples: [128, 128, 128, 128, 0, 0, 0, 0, 128, 256]
    mean = (5 * 128 + 256) / 10 = 89.6
    p99 (numpy's linear quantile, as peft): sorted, position 0.99 * 9 = 8.91 between
    s[8] = 128 and s[9] = 256: 128 + 0.91 * 128 = 244.48 (the max, 256, is the peak)."""
    with PeakMemory("cpu") as pm:
        x = _hold(128)
        for _ in range(3):
            step_sample()
        del x
        step_sample()  # step 4: x lived during part of it
        for _ in range(4):
            step_sample()
        a = _hold(128)
        step_sample()
        del a
        b = _hold(256)
        step_sample()
        del b
    got = pm.step_mb
    assert len(got) == 10
    want = [128, 128, 128, 128, 0, 0, 0, 0, 128, 256]
    assert got == pytest.approx(want, abs=4), got
    assert pm.avg_mb == pytest.approx(89.6, abs=3)
    assert pm.p99_mb == pytest.approx(244.48, abs=3)
    assert pm.peak_mb == pytest.approx(256, abs=4)
    m = pm.metrics()
    assert m == {names.PEAK_MEMORY: pm.peak_mb, names.MEMORY_AVG: pm.avg_mb,
                 names.MEMORY_P99: pm.p99_mb}


def test_no_step_no_average():
    """A window that trained no step (a run resumed at its end) has a peak and nothing else:
    an average of no samples would be a made-up 0."""
    with PeakMemory("cpu") as pm:
        pass
    assert pm.avg_mb is None and pm.p99_mb is None
    assert set(pm.metrics()) == {names.PEAK_MEMORY}
    step_sample()  # a closed window is fed no more samples
    assert pm.step_mb == []


def test_training_loop_samples_each_optimiser_step():
    """The real loop (tasks/train.py) feeds one sample per optimiser step, not per micro-batch:
    5 steps of 2 accumulated micro-batches give 5 samples, each at most the peak."""
    from _models import tiny_bert

    from tasks.config.schema import TrainingConfig
    from tasks.data.collate import SplitData
    from tasks.train import train_model

    model = tiny_bert()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 100, (12,), generator=g).tolist() for _ in range(40)]
    train = SplitData(ids, [i % 2 for i in range(40)])
    cfg = TrainingConfig(max_steps=5, batch_size=4, grad_accum=2, lr=1e-3, device="cpu")
    with PeakMemory("cpu") as pm:
        res = train_model(model, train, cfg, 1e-3, 0, torch.device("cpu"))
    assert res.steps == 5
    assert len(pm.step_mb) == 5
    assert max(pm.step_mb) <= pm.peak_mb
    assert 0 <= pm.avg_mb <= pm.p99_mb <= pm.peak_mb
