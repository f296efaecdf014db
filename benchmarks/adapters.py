"""Train-step time and peak memory: our adapters vs Hugging Face peft, side by side.

    python benchmarks/adapters.py                       # GPT-2-small shape, fp32, CPU, 2 threads
    python benchmarks/adapters.py --shape large --dtype bfloat16 --device cuda   # on a GPU

Time: for each method one subprocess holds both models (ours and peft's, on the same random
base) and alternates their train steps, swapping which goes first every step, so that load
from other processes on a shared machine hits both alike. Memory: each (implementation,
method) runs alone in its own subprocess, so one's peak never counts towards another's.
Weights are random (no hub here): speed and memory do not depend on them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
    rotates every step)."""
    torch.set_num_threads(args.threads)
    impls = ["ours", "peft", "floor"]
    steps = {impl: make_step(args, *setup(args, impl)) for impl in impls}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times = {impl: [] for impl in impls}
    for i in range(args.steps):
        for impl in impls[i % 3:] + impls[:i % 3]:
            times[impl].append(steps[impl]())
    return times


def child_mem(args) -> dict:
    """One implementation alone: peak memory above the loaded model over a few steps (the
    first step allocates AdamW's state)."""
    from tasks.memory import PeakMemory
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


def table(times: dict, mem: dict) -> str:
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = ["| method | ours ms/step | peft ms/step | ours/peft time | floor ms/step | "
            "peft's adapter share | ours peak MB | peft peak MB | ours/peft mem |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        o, p, f = (m, "ours"), (m, "peft"), (m, "floor")
        if o in med:
            share = (med[p] - med[f]) / med[p]
            rows.append(f"| {m} | {med[o]:.1f} | {med[p]:.1f} | {med[o] / med[p]:.2f} | "
                        f"{med[f]:.1f} | {share:.0%} | {mem[o]:.0f} | {mem[p]:.0f} | "
                        f"{mem[o] / max(mem[p], 1e-9):.2f} |")

    def ratio(a, b, target=""):
        r = f"{med[a] / med[b]:.2f}" if a in med and b in med else "n/a"
        return f"{a[1]} {a[0]} / {b[1]} {b[0]}".ljust(26) + f"= {r}" + (f"  (target <= {target})" if target else "")
    rows += ["", "floor = the frozen base with backward through every layer and no adapter; "
             "peft's adapter share = (peft - floor) / peft, the most any adapter code can save.",
             "", ratio(("lora", "ours"), ("lora", "peft"), "0.9"),
             ratio(("dora", "ours"), ("lora", "ours"), "1.3"),
             ratio(("dora", "peft"), ("lora", "peft")),
             ratio(("qlora", "ours"), ("lora", "ours"), "1.5"),
             ratio(("qlora", "peft"), ("lora", "peft"))]
    return "\n".join(rows)


def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            args.model_dir = tmp
            build_model_dir(args.shape, Path(tmp))
        times, mem = {}, {}
        for method in args.methods.split(","):
            t = run_child(args, "time", method)
            times[(method, "floor")] = t["floor"]
            for impl in ("ours", "peft"):
                times[(method, impl)] = t[impl]
                # RSS peaks wobble by tens of MB run to run; the lowest of a few is the need.
                mem[(method, impl)] = min(run_child(args, "mem", method, impl)["peak_mb"]
                                          for _ in range(args.mem_reps))
                print(f"{method:6s} {impl:5s} median {statistics.median(t[impl]) * 1e3:8.1f} ms"
                      f"  peak {mem[(method, impl)]:6.0f} MB", flush=True)
    print(f"\nshape={args.shape} dtype={args.dtype} device={args.device} threads={args.threads} "
          f"batch={args.batch}x{args.seq} r={args.rank} alpha={args.alpha} "
          f"dropout={args.dropout} steps={args.steps} (interleaved) warmup={args.warmup}\n")
    print(table(times, mem))


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
