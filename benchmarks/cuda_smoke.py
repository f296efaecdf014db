"""CUDA smoke run of the pipeline's train/eval path: a tiny local model, full and 4-bit, bf16.

    python benchmarks/cuda_smoke.py [--data ../shared/data/sst2] [--steps 20] [--out FILE]

Builds the tiny GPT-2-style model (`tasks.models.tiny`), then for each method loads it as the
pipeline does (`tasks.load.load_model`: float for full/LoRA/DoRA, bitsandbytes NF4 on the GPU for
QLoRA), injects adapters (`peft_modules.inject_adapters`), trains a few steps with
`tasks.train.train_model` (bf16 autocast) and evaluates with `tasks.evaluate.evaluate_model`.
Prints a Markdown table: steps/s, peak GPU memory (`torch.cuda.max_memory_allocated`, load
included), accuracy (meaningless: random model, few steps) and whether every loss was finite.
Exits 1 if a loss was not finite. Without CUDA, or without bitsandbytes' CUDA kernels for
QLoRA, it says so and skips. `--device cpu` runs the same path on the CPU (fp32, RSS peak), to
check the script where there is no GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

METHODS = ("full", "lora", "dora", "qlora")


def bnb_cuda_problem() -> str | None:
    """Why 4-bit on CUDA cannot run here, or None when an NF4 round trip works on the GPU."""
    try:
        import bitsandbytes.functional as F
    except ImportError as e:
        return f"bitsandbytes not importable ({e})"
    try:
        w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        q, state = F.quantize_4bit(w, quant_type="nf4")
        back = F.dequantize_4bit(q, state)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any failure means: no usable CUDA kernels
        return f"bitsandbytes has no working CUDA 4-bit kernels ({type(e).__name__}: {e})"
    if not torch.isfinite(back).all() or (back - w).abs().mean() > 0.2:
        return "bitsandbytes NF4 round trip on CUDA gave wrong values"
    return None


def run_method(name: str, model_dir: str, data, steps: int, device: torch.device) -> dict:
    import peft_modules as pm
    from tasks.config.schema import MethodConfig, ModelConfig, TrainingConfig
    from tasks.evaluate import evaluate_model
    from tasks.load import load_model
    from tasks.train import train_model
    from tasks.training.memory import PeakMemory

    compute = "bfloat16" if device.type == "cuda" else "float32"
    method = MethodConfig(name=name, method=name, rank=8, alpha=16, targets=["c_attn"],
                          **({"quantization": {"compute_dtype": compute}}
                             if name == "qlora" else {}))
    cfg = TrainingConfig(max_steps=steps, batch_size=16, lr=1e-3, device=device.type,
                         precision="bf16", seed=42)  # autocast applies on CUDA only
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(cfg.seed)
    # On CUDA: torch.cuda.max_memory_allocated over load + train + eval.
    with PeakMemory(device) as mem:
        model = load_model(ModelConfig(name_or_path=model_dir), method, data.num_labels,
                           data.pad_token_id, device)
        summary = pm.inject_adapters(model, method.adapter_spec())
        res = train_model(model, data.train, cfg, cfg.lr, data.pad_token_id, device)
        ev = evaluate_model(model, data.eval, data.num_labels, data.pad_token_id, device,
                            precision=cfg.precision).metrics
    four_bit = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    finite = all(math.isfinite(x) for x in res.losses) and math.isfinite(ev["loss"])
    row = {"method": name, "steps_per_s": res.steps / res.train_time_s, "peak_mb": mem.peak_mb,
           "accuracy": ev["accuracy"], "finite": finite, "four_bit_layers": four_bit,
           "trainable": summary.trainable_params, "last_loss": res.losses[-1]}
    del model
    return row


def table(rows: list[dict]) -> str:
    out = ["| method | steps/s | peak MB | accuracy | finite loss | last train loss | "
           "4-bit layers | trainable params |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['steps_per_s']:.1f} | {r['peak_mb']:.0f} | "
                   f"{r['accuracy']:.3f} | {'yes' if r['finite'] else 'NO'} | "
                   f"{r['last_loss']:.4f} | {r['four_bit_layers']} | {r['trainable']:,} |")
    return "\n".join(out)


def main(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipping cuda_smoke (full/LoRA/DoRA/QLoRA train + eval)")
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # each load would print a report on the fresh score head
    hf_logging.disable_progress_bar()
    from tasks.config.schema import DataConfig
    from tasks.models.tiny import make_tiny_model
    from tasks.prepare import tokenize_splits

    methods = [m for m in args.methods.split(",") if m]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (fp32, no autocast)"
    notes = [f"device: {name}, torch {torch.__version__}, {args.steps} steps, batch 16, "
             "bf16 autocast on CUDA"]
    problem = bnb_cuda_problem() if "qlora" in methods and device.type == "cuda" else None
    if problem:
        notes.append(f"{problem}: skipping qlora")
        methods.remove("qlora")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model(Path(tmp) / "tiny", Path(args.data), vocab_size=1024,
                                        n_layer=2, n_embd=128, n_head=4))
        data = tokenize_splits(DataConfig(source=args.data, train_size=640, eval_size=256,
                                          max_length=64), model_dir)
        rows = [run_method(m, model_dir, data, args.steps, device) for m in methods]
    text = "\n".join(notes + ["", table(rows)])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["finite"] for r in rows) else 1


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("DATA", str(ROOT.parent / "shared/data/sst2")))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None, help="also write the table to this file")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse()))
