"""Train-step time and peak memory: our adapters vs Hugging Face peft, side by side.

    python benchmarks/adapters.py                       # GPT-2-small shape, fp32, CPU, 2 threads
    python benchmarks/adapters.py --shape large --dtype bfloat16 --device cuda   # on a GPU

Each (implementation, method) runs in its own subprocess, so that one's memory never counts
towards another's, and the runs alternate ours/peft `--reps` times so that drift on a shared
machine hits both. Weights are random (no hub here): speed and memory do not depend on them.
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
SHAPES = {"small": dict(n_layer=12, n_embd=768, n_head=12),
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


def child(args) -> dict:
    from tasks.memory import PeakMemory
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = inject(load(Path(args.model_dir), args.method, dtype, args.device),
                   args.impl, args.method, args.rank, args.alpha, args.dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50000, (args.batch, args.seq), generator=g).to(args.device)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = []
    with PeakMemory(args.device) as mem:
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with torch.autocast(args.device, dtype=dtype, enabled=args.device == "cuda"
                                and dtype != torch.float32):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
    return {"times": times, "peak_mb": mem.peak_mb}


def run_child(args, impl: str, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--method", method]
    for k in ("model_dir", "device", "dtype", "threads", "batch", "seq", "steps", "warmup",
              "rank", "alpha", "dropout"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{impl}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(res: dict) -> str:
    med = {k: statistics.median(v["times"]) * 1e3 for k, v in res.items()}
    mem = {k: max(v["peak_mb"]) for k, v in res.items()}
    rows = ["| method | ours ms/step | peft ms/step | ours/peft time | ours peak MB | "
            "peft peak MB | ours/peft mem |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        o, p = (m, "ours"), (m, "peft")
        if o in med:
            rows.append(f"| {m} | {med[o]:.1f} | {med[p]:.1f} | {med[o] / med[p]:.2f} | "
                        f"{mem[o]:.0f} | {mem[p]:.0f} | {mem[o] / max(mem[p], 1e-9):.2f} |")
    ratio = lambda a, b: f"{med[a] / med[b]:.2f}" if a in med and b in med else "n/a"
    rows += ["", f"our LoRA / peft LoRA     = {ratio(('lora', 'ours'), ('lora', 'peft'))}"
             "  (target <= 0.9)",
             f"our DoRA / our LoRA      = {ratio(('dora', 'ours'), ('lora', 'ours'))}"
             "  (target <= 1.3)",
             f"peft DoRA / peft LoRA    = {ratio(('dora', 'peft'), ('lora', 'peft'))}",
             f"our QLoRA / our LoRA     = {ratio(('qlora', 'ours'), ('lora', 'ours'))}"
             "  (target <= 1.5)",
             f"peft QLoRA / peft LoRA   = {ratio(('qlora', 'peft'), ('lora', 'peft'))}"]
    return "\n".join(rows)


def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            args.model_dir = tmp
            build_model_dir(args.shape, Path(tmp))
        res: dict = {}
        for method in args.methods.split(","):
            for rep in range(args.reps):
                for impl in (("ours", "peft") if rep % 2 == 0 else ("peft", "ours")):
                    r = run_child(args, impl, method)
                    slot = res.setdefault((method, impl), {"times": [], "peak_mb": []})
                    slot["times"] += r["times"]
                    slot["peak_mb"].append(r["peak_mb"])
                    print(f"{method:6s} {impl:5s} rep {rep}: median "
                          f"{statistics.median(r['times']) * 1e3:.1f} ms, peak "
                          f"{r['peak_mb']:.0f} MB", flush=True)
    print(f"\nshape={args.shape} dtype={args.dtype} device={args.device} threads={args.threads} "
          f"batch={args.batch}x{args.seq} r={args.rank} alpha={args.alpha} "
          f"dropout={args.dropout} steps={args.steps} reps={args.reps}\n")
    print(table(res))


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--impl", choices=["ours", "peft"])
    ap.add_argument("--method", choices=METHODS)
    return ap.parse_args()


if __name__ == "__main__":
    a = parse()
    if a.child:
        print(json.dumps(child(a)))
    else:
        main(a)
