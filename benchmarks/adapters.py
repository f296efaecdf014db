"""Train-step time and peak memory: our adapters vs Hugging Face peft, side by side.

    python benchmarks/adapters.py                       # GPT-2-small shape, fp32, CPU, 2 threads
    python benchmarks/adapters.py --shape large --dtype bfloat16 --device cuda   # on a GPU

Time: for each method one subprocess holds both models (ours and peft's, on the same random
base) and alternates their train steps, swapping which goes first every step, so that load
from other processes on a shared machine hits both alike. Memory: each (implementation,
method) runs alone in its own subprocess, so one's peak never counts towards another's.
Weights are random (no hub here): speed and memory do not depend on them.

Noise: each time is printed as median [inter-quartile range] over the interleaved steps, each
ratio with a seeded bootstrap 95% interval, with the CPU share other processes took while the
steps ran (`tasks.training.machine_load`). The verdicts on the targets give way to WARNING lines when a
spread or the outside load is too large, or when an adapter comes out faster than the floor
(the same model without adapter) beyond noise, which no correct measurement can show.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._noise import Checks, describe_load, ratio_of_medians, spread, target_verdict  # noqa: E402
from tasks.training.machine_load import LoadReading, MachineLoad  # noqa: E402

SHAPES = {"tiny": dict(n_layer=2, n_embd=256, n_head=4),  # a smoke test of the script
          "small": dict(n_layer=12, n_embd=768, n_head=12),
          "large": dict(n_layer=36, n_embd=1280, n_head=20)}
METHODS = ("lora", "dora", "qlora")


def build_model_dir(shape: str, out: Path) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(0)
    cfg = GPT2Config(**SHAPES[shape], num_labels=2, pad_token_id=50256)
    GPT2ForSequenceClassification(cfg).save_pretrained(out)


def load(model_dir: Path, method: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
    kwargs = {"dtype": dtype}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
    from peft_modules.quant import keep_layout
    return keep_layout(model.to(device) if method != "qlora" else model).train()


def inject(model, impl: str, method: str, rank: int, alpha: float, dropout: float):
    if impl == "ours":
        import peft_modules as pm
        pm.inject_adapters(model, pm.AdapterSpec(method=method, rank=rank, alpha=alpha,
                                                 dropout=dropout, targets=["c_attn"]))
        return model
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=["c_attn"], use_dora=method == "dora")
    return get_peft_model(model, cfg)


def floor(model):
    """The same frozen base with no adapter, but with the backward still running through
    every layer (as it must for an adapter in layer 0): what no adapter code can beat."""
    model.requires_grad_(False)
    model.score.requires_grad_(True)
    model.transformer.drop.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return model


def setup(args, impl: str):
    dtype = getattr(torch, args.dtype)
    model = load(Path(args.model_dir), args.method, dtype, args.device)
    model = floor(model) if impl == "floor" else inject(model, impl, args.method, args.rank,
                                                         args.alpha, args.dropout)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def make_step(args, model, opt):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50000, (args.batch, args.seq), generator=g).to(args.device)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(args.device)
    dtype = getattr(torch, args.dtype)
    amp = args.device == "cuda" and dtype != torch.float32
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=amp):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0
    return step


def child_time(args) -> dict:
    """Ours, peft's and the adapter-free floor in one process, steps interleaved (the order
    rotates every step), and the load other processes put on the machine meanwhile."""
    torch.set_num_threads(args.threads)
    impls = ["ours", "peft", "floor"]
    steps = {impl: make_step(args, *setup(args, impl)) for impl in impls}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times = {impl: [] for impl in impls}
    with MachineLoad(gpu_index=0 if args.device == "cuda" else None) as load:
        for i in range(args.steps):
            for impl in impls[i % 3:] + impls[:i % 3]:
                times[impl].append(steps[impl]())
    r = load.reading
    return {**times, "load": {"wall_s": r.wall_s, "cpus": r.cpus, "other_cpu_s": r.other_cpu_s,
                              "gpu_others": r.gpu_others}}


def child_mem(args) -> dict:
    """One implementation alone: peak memory above the loaded model over a few steps (the
    first step allocates AdamW's state)."""
    from tasks.training.memory import PeakMemory
    torch.set_num_threads(args.threads)
    model, opt = setup(args, args.impl)
    step = make_step(args, model, opt)
    with PeakMemory(args.device) as mem:
        for _ in range(3):
            step()
    return {"peak_mb": mem.peak_mb}


def run_child(args, mode: str, method: str, impl: str = "ours") -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--impl", impl, "--method", method]
    for k in ("model_dir", "device", "dtype", "threads", "batch", "seq", "steps", "warmup",
              "rank", "alpha", "dropout"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} {impl}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


RATIOS = [  # (numerator, denominator, target for time(num)/time(den) or None)
    (("lora", "ours"), ("lora", "peft"), 0.9),
    (("dora", "ours"), ("lora", "ours"), 1.3),
    (("dora", "peft"), ("lora", "peft"), None),
    (("qlora", "ours"), ("lora", "ours"), 1.5),
    (("qlora", "peft"), ("lora", "peft"), None)]


def table(times: dict, mem: dict, checks: Checks) -> str:
    """Times in ms/step as median [IQR]; every series's spread and the floor go through
    `checks`."""
    sp = {k: checks.spread(f"{k[0]} {k[1]} ms/step", spread(v)) for k, v in times.items()}
    rows = ["| method | ours ms/step | peft ms/step | ours/peft time | floor ms/step | "
            "peft's adapter share | ours peak MB | peft peak MB | ours/peft mem |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        o, p, f = (m, "ours"), (m, "peft"), (m, "floor")
        if o not in sp:
            continue
        for impl in (o, p):
            checks.not_faster_than_floor(f"{m} {impl[1]}", times[impl], times[f])
        share = (sp[p].median - sp[f].median) / sp[p].median
        rows.append(f"| {m} | {sp[o].fmt(1e3)} | {sp[p].fmt(1e3)} | "
                    f"{ratio_of_medians(times[o], times[p]).fmt()} | {sp[f].fmt(1e3)} | "
                    f"{share:.0%} | {mem[o]:.0f} | {mem[p]:.0f} | "
                    f"{mem[o] / max(mem[p], 1e-9):.2f} |")
    return "\n".join(rows + [
        "", "times: median [inter-quartile range] over the interleaved steps; ratios: ratio of "
        "medians [bootstrap 95% interval].",
        "floor = the frozen base with backward through every layer and no adapter; "
        "peft's adapter share = (peft - floor) / peft, the most any adapter code can save."])


def ratio_lines(times: dict) -> tuple[list[str], list[str]]:
    """The figures (always printed) and the verdicts on their targets (printed if no check
    failed)."""
    figures, verdicts = [], []
    for a, b, target in RATIOS:
        name = f"{a[1]} {a[0]} / {b[1]} {b[0]}".ljust(26)
        if a not in times or b not in times:
            figures.append(f"{name}= n/a")
            continue
        r = ratio_of_medians(times[a], times[b])
        figures.append(f"{name}= {r.fmt()}" + (f"  (target <= {target})" if target else ""))
        if target:
            verdicts.append(target_verdict(name.strip(), r, target, higher_is_better=False))
    return figures, verdicts


def report(times: dict, mem: dict, loads: dict[str, LoadReading]) -> str:
    checks = Checks()
    out = [table(times, mem, checks), ""]
    for method, reading in loads.items():
        checks.load(reading, f"while timing {method}")
        out.append(describe_load(reading, f"while timing {method}"))
    figures, verdicts = ratio_lines(times)
    return "\n".join(out + [""] + figures + ["", checks.verdict("\n".join(verdicts))])


def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            args.model_dir = tmp
            build_model_dir(args.shape, Path(tmp))
        times, mem, loads = {}, {}, {}
        for method in args.methods.split(","):
            t = run_child(args, "time", method)
            loads[method] = LoadReading(**t["load"])
            times[(method, "floor")] = t["floor"]
            for impl in ("ours", "peft"):
                times[(method, impl)] = t[impl]
                # RSS peaks wobble by tens of MB run to run; the lowest of a few is the need.
                mem[(method, impl)] = min(run_child(args, "mem", method, impl)["peak_mb"]
                                          for _ in range(args.mem_reps))
                print(f"{method:6s} {impl:5s} {spread(t[impl]).fmt(1e3):>24s} ms"
                      f"  peak {mem[(method, impl)]:6.0f} MB", flush=True)
    print(f"\nshape={args.shape} dtype={args.dtype} device={args.device} threads={args.threads} "
          f"batch={args.batch}x{args.seq} r={args.rank} alpha={args.alpha} "
          f"dropout={args.dropout} steps={args.steps} (interleaved) warmup={args.warmup}\n")
    print(report(times, mem, loads))


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-reps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--child", choices=["time", "mem"])
    ap.add_argument("--impl", choices=["ours", "peft"])
    ap.add_argument("--method", choices=METHODS)
    return ap.parse_args()


if __name__ == "__main__":
    a = parse()
    if a.child:
        print(json.dumps(child_time(a) if a.child == "time" else child_mem(a)))
    else:
        main(a)
