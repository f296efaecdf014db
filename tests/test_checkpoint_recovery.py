"""Resume that survives a bad checkpoint: each checkpoint is verified when written (before the
previous one may go) and before it is loaded; a damaged one is named and skipped for the
newest earlier one that verifies, or the run starts again from step 0, and the reason is on
the run. Unit level on a small torch model with a real optimiser and scheduler; then end to
end through the real CLI: SIGKILL mid-training, truncate the latest checkpoint, resume."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, ceiling, make_bench_config
from torch import nn
from transformers import get_scheduler

from tasks.common import names
from tasks.training import checkpoint
from tasks.training.checkpoint import Progress

CPU = torch.device("cpu")


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=50)
    return model, opt, sched


def _step(model, opt, sched) -> None:
    loss = model(torch.randn(3, 4)).sum()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _train(folder: Path, steps: int, keep: int = 2) -> dict[int, dict[str, torch.Tensor]]:
    """Train `steps` steps, checkpointing each; returns the weights after every step."""
    model, opt, sched = _setup()
    seen = {}
    for step in range(1, steps + 1):
        _step(model, opt, sched)
        checkpoint.save(folder, model, opt, sched, Progress(step=step, samples=3 * step),
                        torch.Generator().get_state(), CPU, keep=keep)
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return seen


def _restore(folder: Path):
    model, opt, sched = _setup(seed=1)  # other weights than the trained ones
    return checkpoint.restore(folder, model, opt, sched, CPU), model, opt


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))


# ------------------------------------------------------------------ writing
def test_keep_last_counts_and_each_checkpoint_has_a_manifest(tmp_path):
    _train(tmp_path / "two", 4, keep=2)
    assert _steps(tmp_path / "two") == ["step-3", "step-4"]
    _train(tmp_path / "one", 3, keep=1)
    assert _steps(tmp_path / "one") == ["step-3"]
    folder = tmp_path / "two" / "step-4"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest) == ["progress.json", "state.pt", "trainable.safetensors"]
    for name, entry in manifest.items():
        assert entry["size"] == (folder / name).stat().st_size
        assert entry["sha256"] == checkpoint.sha256_of(folder / name)


def test_keep_last_is_a_training_setting_outside_the_run_key(tmp_path, bench_config):
    from tasks.config.build import build_config, fingerprint
    from tasks.tracking.reuse import run_key

    default = build_config(bench_config, mlflow_yaml=None)
    more = build_config(bench_config, overrides=["training.keep_last=5"], mlflow_yaml=None)
    assert (default.training.keep_last, more.training.keep_last) == (2, 5)
    # Where checkpoints are kept changes no number: old run keys and histories still match.
    assert run_key(default, "lora", "eval", "d", "cpu") == run_key(more, "lora", "eval", "d", "cpu")
    assert fingerprint(default) == fingerprint(more)
    with pytest.raises(Exception, match="training.keep_last: Input should be greater than"):
        build_config(bench_config, overrides=["training.keep_last=0"], mlflow_yaml=None)


def test_a_write_that_does_not_read_back_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _train(tmp_path, 2, keep=1)
    model, opt, sched = _setup()

    def short_write(tensors, path):  # a write that came out short (disk trouble)
        real_save(tensors, path)
        _truncate(Path(path))

    real_save = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", short_write)
    with pytest.raises(checkpoint.Unusable, match="trainable.safetensors: not a readable"):
        checkpoint.save(tmp_path, model, opt, sched, Progress(step=3),
                        torch.Generator().get_state(), CPU, keep=1)
    assert (tmp_path / "latest").read_text() == "step-2"
    assert _steps(tmp_path) == ["step-2"]  # not deleted for a checkpoint that failed


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    seen = _train(tmp_path, 2)
    model, opt, sched = _setup()

    def killed(*args, **kwargs):  # the process dies between the tensors and the state
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, model, opt, sched, Progress(step=3),
                        torch.Generator().get_state(), CPU)
    monkeypatch.undo()
    assert (tmp_path / ".step-3.tmp" / "trainable.safetensors").is_file()
    assert (tmp_path / "latest").read_text() == "step-2"
    back, restored, _ = _restore(tmp_path)
    assert back.progress.step == 2 and back.note is None
    assert all(torch.equal(v, seen[2][k]) for k, v in restored.state_dict().items())


# ------------------------------------------------------------------ restoring
@pytest.mark.parametrize("name", ["trainable.safetensors", "state.pt", "progress.json"])
def test_a_truncated_latest_falls_back_to_the_previous_and_says_so(tmp_path, name):
    seen = _train(tmp_path, 3)
    bad = tmp_path / "step-3" / name
    _truncate(bad)
    back, model, opt = _restore(tmp_path)
    assert back.progress.step == 2 and back.progress.resumed_from == 2
    assert back.note.startswith(f"checkpoint skipped on resume: {bad}: ")
    assert "the manifest says" in back.note and "(truncated or overwritten)" in back.note
    assert back.note.endswith("Resumed from the earlier step-2 instead")
    assert all(torch.equal(v, seen[2][k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"]  # AdamW's moments came back too


def test_a_changed_or_incomplete_checkpoint_is_named(tmp_path):
    _train(tmp_path, 3, keep=3)
    state = tmp_path / "step-3" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    state.write_bytes(bytes(data))
    _truncate(tmp_path / "step-2" / "trainable.safetensors")
    (tmp_path / "step-2" / "manifest.json").unlink()  # and no manifest to say so
    back, _, _ = _restore(tmp_path)
    assert back.progress.step == 1
    assert f"{state}: its SHA-256 differs from the manifest's" in back.note
    assert f"{tmp_path / 'step-2' / 'trainable.safetensors'}: not a readable safetensors" \
        in back.note


def test_a_checkpoint_from_before_manifests_is_resumed_with_a_note(tmp_path):
    """An earlier peft-bench wrote no manifest (its `latest` moved only once a checkpoint was
    whole): one whose files parse is resumed, and the note says its digests were unchecked."""
    seen = _train(tmp_path, 3, keep=2)
    (tmp_path / "step-3" / "manifest.json").unlink()
    back, model, _ = _restore(tmp_path)
    assert back.progress.step == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in seen[3].items())
    assert f"{tmp_path / 'step-3'} was written by an earlier peft-bench, without a manifest" \
        in back.note


def test_all_checkpoints_bad_restarts_from_step_0_with_a_note(tmp_path):
    _train(tmp_path, 2)
    for step in (1, 2):
        _truncate(tmp_path / f"step-{step}" / "trainable.safetensors")
    model, opt, sched = _setup(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    back = checkpoint.restore(tmp_path, model, opt, sched, CPU)
    assert back.from_scratch and back.progress.step == 0 and back.progress.resumed_from is None
    for step in (1, 2):
        assert str(tmp_path / f"step-{step}" / "trainable.safetensors") in back.note
    assert back.note.endswith("No complete checkpoint was left: the run restarted from step 0")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    checkpoint.save(tmp_path, model, opt, sched, Progress(step=1),
                    torch.Generator().get_state(), CPU)
    assert _steps(tmp_path) == ["step-1"]  # the damaged step-2 of the abandoned run is gone


def test_no_checkpoint_is_none_and_one_that_does_not_fit_stays_an_error(tmp_path):
    assert _restore(tmp_path / "none")[0] is None
    _train(tmp_path, 1)
    other = nn.Linear(4, 2)
    opt = torch.optim.AdamW(other.parameters())
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=5)
    with pytest.raises(ValueError, match="checkpoint does not fit this model"):
        checkpoint.restore(tmp_path, other, opt, sched, CPU)


# ------------------------------------------------------------------ through the CLI
def _ckpt_config(tmp_path: Path, tiny_model_dir: Path, sst2_dir: Path) -> dict:
    cfg = make_bench_config(tmp_path, tiny_model_dir, sst2_dir)
    cfg["name"] = "recovery"
    cfg["methods"] = [{**cfg["methods"][1], "dropout": 0.1}]  # lora
    cfg["data"].update(train_size=144)
    cfg["training"].update(max_steps=300, eval_every=100, checkpoint_every=10, num_threads=1,
                           checkpoint_dir=str(tmp_path / "ckpt"))
    return cfg


def _complete(ckpt: Path) -> list[Path]:
    return [p.parent for p in ckpt.glob("*/step-*/manifest.json")]


def test_a_truncated_checkpoint_on_resume_falls_back_and_the_run_finishes(tmp_path,
                                                                          tiny_model_dir,
                                                                          sst2_dir):
    from test_faults import _cli, _cli_env, _runs

    cfg = _ckpt_config(tmp_path, tiny_model_dir, sst2_dir)
    uri, ckpt = cfg["tracking"]["tracking_uri"], tmp_path / "ckpt"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = _cli_env(tmp_path)
    proc = subprocess.Popen(_cli("run", str(tmp_path / "run.yaml")), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the event: two complete checkpoints; the ceiling only catches a hang
        deadline = time.monotonic() + ceiling(240)
        while len(_complete(ckpt)) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    [run_dir] = list(ckpt.iterdir())
    latest = run_dir / (run_dir / "latest").read_text()
    previous = int(latest.name.split("-")[1]) - 10
    assert (run_dir / f"step-{previous}" / "manifest.json").is_file()
    bad = latest / "trainable.safetensors"
    _truncate(bad)
    parent = next(r.info.run_id for r in _runs(uri, "ci")
                  if r.data.tags.get(names.ROLE) == names.ROLE_PARENT)

    out = subprocess.run(_cli("run", "--resume", parent, "--set", f"tracking.tracking_uri={uri}",
                              "--set", "tracking.experiment=ci"),
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=ceiling(600))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [lora] = [r for r in _runs(uri, "ci") if r.data.tags.get(names.ROLE) == names.ROLE_CHILD]
    assert lora.info.status == "FINISHED" and lora.info.run_id == run_dir.name
    assert lora.data.metrics[names.TRAIN_STEPS] == 300
    assert lora.data.tags[names.RESUMED] == str(previous)
    note = lora.data.tags[names.RESUME_NOTE]
    assert note.startswith(f"checkpoint skipped on resume: {bad}: ") and "truncated" in note
    assert note.endswith(f"Resumed from the earlier step-{previous} instead")
    assert f"⚠ checkpoint skipped on resume: {bad}" in out.stdout  # on the console too
