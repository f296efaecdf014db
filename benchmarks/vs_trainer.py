"""Our training loop against transformers' Trainer: samples/s, tokens/s and final accuracy.

    python benchmarks/vs_trainer.py [--model PATH|package:NAME] [--rounds 3] [--steps 30]
                                    [--batch-size 16] [--grouping defaults|both|none]

The same on both sides: the model (loaded by `tasks.load.load_model`), the SST-2 rows
(`tasks.prepare.tokenize_splits`), the batch size, the collator (`tasks.data.collate.Collator`: right
padding), the optimiser and schedule (AdamW over `tasks.train.param_groups`, so weight decay on
matrices only, and `get_scheduler` linear with the same warmup, both built here and handed to
Trainer), clipping, fp32 on the CPU, the thread count, the seed and the number of steps. Full
fine-tuning and LoRA (ours: `peft_modules`; Trainer's side: HF peft's `LoraConfig`, the usual
pairing) run interleaved in one process, round after round, the order rotating every round.

What differs: the data order. Ours comes from `make_loader`'s own seeded generator, Trainer's
from its sampler (accelerate's seedable RandomSampler, or when grouped transformers'
LengthGroupedSampler, which puts the longest mega-batch first and does not shuffle batch order).
`--grouping defaults` runs each side at its own default: ours groups by length
(`training.group_by_length`, on by default), Trainer does not. LoRA takes the family's default
targets on both sides (`peft_modules.resolve_targets`), and both train the same head.
Same rows and seed, other permutations, so padding differs a little: tokens/s counts real
tokens only, on both sides. LoRA's A matrices are initialised by different code, too.

Timing: the training steps only. Ours is `TrainResult.train_time_s`; Trainer's runs from
`on_train_begin` to `on_step_end` of the last step (a callback), so loading, Trainer and
accelerate set-up and evaluation are out on both sides. Trainer writes nothing while it trains:
no saving, logging, evaluation, reporting or progress bar.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks._flops import flops_per_token, matmul_rate, matmul_shapes  # noqa: E402
from benchmarks._noise import Checks, describe_load, ratio_of_medians, spread, target_verdict  # noqa: E402
from tasks.training.machine_load import LoadReading, MachineLoad  # noqa: E402

ORDER = [("ours", "full"), ("trainer", "full"), ("ours", "lora"), ("trainer", "lora")]
# Issue #21's targets for ours / Trainer samples/s, by --grouping: each side at its own default
# (ours groups by length, Trainer does not), both grouped, neither grouped (issue #11's 1.2).
GROUPINGS = {"defaults": {"ours": True, "trainer": False},
             "both": {"ours": True, "trainer": True},
             "none": {"ours": False, "trainer": False}}
TARGETS = {"defaults": 2.0, "both": 1.0, "none": 1.2}


def grouped(args, impl: str) -> bool:
    return GROUPINGS[args.grouping][impl]


def adapter_spec(args):
    import peft_modules as pm

    return pm.AdapterSpec(method="lora", rank=args.rank, alpha=args.alpha)  # default targets


@dataclass
class Run:
    impl: str
    method: str
    samples: int
    tokens: int  # real (non-pad) tokens trained on
    positions: int  # padded positions trained on: tokens / positions = 1 - padding
    time_s: float
    accuracy: float
    eval_loss: float
    adapter_params: int | None = None  # LoRA's A and B weights; None: full fine-tuning

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.time_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_s


def prepare(args, tmp: Path):
    """The model folder (the tiny model, built, unless --model) and the tokenised rows."""
    from tasks.config.schema import DataConfig
    from tasks.models.tiny import make_tiny_model
    from tasks.prepare import tokenize_splits

    model = args.model or str(make_tiny_model(tmp / "tiny-gpt2", Path(args.data)))
    cfg = DataConfig(source=args.data, train_size=args.train_size, eval_size=args.eval_size,
                     max_length=args.max_length, seed=args.seed)
    return model, tokenize_splits(cfg, model)


def load(args, model_path: str, data, method: str):
    from tasks.config.schema import MethodConfig, ModelConfig
    from tasks.load import load_model

    return load_model(ModelConfig(name_or_path=model_path), MethodConfig(name=method, method=method),
                      data.num_labels, data.pad_token_id, torch.device("cpu"))


def training_config(args):
    from tasks.config.schema import TrainingConfig

    return TrainingConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          scheduler="linear", warmup_ratio=args.warmup_ratio,
                          weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                          seed=args.seed, device="cpu", precision="fp32")


def evaluate(model, data) -> tuple[float, float]:
    from tasks.evaluate import evaluate_model

    m = evaluate_model(model, data.eval, data.num_labels, data.pad_token_id,
                       torch.device("cpu")).metrics
    return m["accuracy"], m["loss"]


def run_ours(args, model_path: str, data, method: str) -> Run:
    import peft_modules as pm
    from tasks.data.collate import make_loader, padding_fraction
    from tasks.train import train_model

    # Seeded before loading: the fresh score head is drawn from the global RNG, and without this
    # it would depend on whichever run came before in the rotation.
    torch.manual_seed(args.seed)
    model = load(args, model_path, data, method)
    if method == "lora":  # the family's default targets, as a run would take them
        pm.inject_adapters(model, adapter_spec(args))
    group = grouped(args, "ours")
    cfg = training_config(args).model_copy(update={"group_by_length": group})
    res = train_model(model, data.train, cfg, args.lr, data.pad_token_id, torch.device("cpu"))
    # The same seed gives the same batches: their padding, measured on a twin loader.
    twin = make_loader(data.train, args.batch_size, shuffle=True, seed=args.seed,
                       pad_token_id=data.pad_token_id, group_by_length=group)
    positions = round(res.tokens / (1 - padding_fraction(twin, max_batches=res.steps)))
    return Run("ours", method, res.samples, res.tokens, positions, res.train_time_s,
               *evaluate(model, data), lora_params(model, method))


class CountingCollator:
    """Our collator, noting each batch's rows, real tokens and positions in the order made.
    Batches are consumed in that order, so the first `steps` are the ones trained on (accelerate
    makes one more ahead of time, to detect the end)."""

    def __init__(self, pad_token_id: int):
        from tasks.data.collate import Collator

        self.inner, self.seen = Collator(pad_token_id), []

    def __call__(self, batch):
        out = self.inner(batch)
        mask = out["attention_mask"]
        self.seen.append((len(batch), int(mask.sum()), mask.numel()))
        return out


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time from the start of the training loop to the end of the last step."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                self.elapsed = time.perf_counter() - self.t0

    return StepTimer()


def trainer_args(args, out_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        seed=args.seed, data_seed=args.seed, use_cpu=True, report_to=[], save_strategy="no",
        eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False, label_names=["labels"],
        # transformers 5 spells `group_by_length=True` as this sampling strategy.
        train_sampling_strategy="group_by_length" if grouped(args, "trainer") else "random")


def run_trainer(args, model_path: str, data, method: str) -> Run:
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, get_scheduler

    from tasks.train import param_groups

    torch.manual_seed(args.seed)  # the same score head as ours gets
    model = load(args, model_path, data, method)
    if method == "lora":  # the same targets and trainable head as ours
        import peft_modules as pm
        from peft_modules.inject import resolve_targets

        targets = resolve_targets(model, adapter_spec(args))
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=args.rank,
                                                 lora_alpha=args.alpha, target_modules=targets,
                                                 modules_to_save=pm.head_names(model)))
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    sched = get_scheduler("linear", opt, num_training_steps=args.steps,
                          num_warmup_steps=int(args.warmup_ratio * args.steps))
    collator, timer = CountingCollator(data.pad_token_id), step_timer()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(model=model, args=trainer_args(args, out_dir), train_dataset=data.train,
                          data_collator=collator, optimizers=(opt, sched), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        torch.set_num_threads(args.threads)  # in case accelerate's set-up changed it
        trainer.train()
    rows, tokens, positions = (sum(x) for x in zip(*collator.seen[:args.steps]))
    return Run("trainer", method, rows, tokens, positions, timer.elapsed, *evaluate(model, data),
               lora_params(model, method))


def lora_params(model, method: str) -> int | None:
    """The adapters' own weights (ours: lora_a / lora_b, peft's: lora_A / lora_B)."""
    if method == "full":
        return None
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n.lower())


def run_rounds(args, model_path: str, data) -> tuple[list[Run], LoadReading]:
    """Round k runs ORDER rotated by k, so neither side always goes first or last."""
    runners = {"ours": run_ours, "trainer": run_trainer}
    runs = []
    with MachineLoad() as load:
        for k in range(args.rounds):
            for impl, method in ORDER[k % 4:] + ORDER[:k % 4]:
                torch.set_num_threads(args.threads)
                runs.append(runners[impl](args, model_path, data, method))
                r = runs[-1]
                print(f"round {k + 1}/{args.rounds}  {impl:7s} {method:4s} "
                      f"{r.samples_per_s:8.1f} samples/s {r.tokens_per_s:9.0f} tokens/s  "
                      f"accuracy {r.accuracy:.3f}", flush=True)
    return runs, load.reading


def accuracy_check(checks: Checks, method: str, ours: list[Run], theirs: list[Run],
                   n_eval: int) -> str:
    """Both sides train the same model the same way: accuracies should differ by no more than
    two standard errors of a difference of two accuracies on n_eval rows."""
    a = spread([r.accuracy for r in ours]).median
    b = spread([r.accuracy for r in theirs]).median
    p = min(max((a + b) / 2, 1 / n_eval), 1 - 1 / n_eval)
    se = math.sqrt(2 * p * (1 - p) / n_eval)
    checks.consistent(abs(a - b) <= 2 * se, f"{method}: accuracy ours {a:.3f} vs Trainer "
                                            f"{b:.3f} differs by more than 2 s.e. ({2 * se:.3f})")
    return (f"{method:4s} accuracy ours {a:.3f}  Trainer {b:.3f}  difference {a - b:+.3f} "
            f"(2 s.e. = {2 * se:.3f} on {n_eval} rows)")


def report(runs: list[Run], load: LoadReading, n_eval: int, args,
           random_padding: float | None, shapes, rate: float) -> str:
    checks, lines, verdicts = Checks(), [], []
    lines += ["| method | impl | samples/s | tokens/s | model GFLOP/s | of matmul rate | padding "
              "| accuracy | eval loss |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(i, m): [r for r in runs if (r.impl, r.method) == (i, m)] for i, m in ORDER}
    for (impl, method), rs in by.items():
        sps = checks.spread(f"{method} {impl} samples/s", spread([r.samples_per_s for r in rs]))
        tps = spread([r.tokens_per_s for r in rs])
        pad = 1 - sum(r.tokens for r in rs) / sum(r.positions for r in rs)
        flops = tps.median * flops_per_token(shapes, rs[0].adapter_params)
        lines.append(f"| {method} | {impl} | {sps.fmt()} | {tps.fmt(digits=0)} | "
                     f"{flops / 1e9:.1f} | {flops / rate:.0%} | {pad:.1%} | "
                     f"{spread([r.accuracy for r in rs]).median:.3f} | "
                     f"{spread([r.eval_loss for r in rs]).median:.4f} |")
    lines += ["", "median [inter-quartile range] over rounds; ratios: ratio of medians "
              "[bootstrap 95% interval]; model FLOP/s: real tokens/s x FLOPs per token "
              "(benchmarks/_flops.py), against the fp32 matmul rate at the model's shapes "
              f"measured after the rounds: {rate / 1e9:.1f} GFLOP/s", ""]
    for method in ("full", "lora"):
        ours, theirs = by[("ours", method)], by[("trainer", method)]
        # Only an epoch's short last batch, placed differently, may make the counts differ.
        checks.consistent(abs(ours[0].samples - theirs[0].samples) < args.batch_size,
                          f"{method}: ours trained {ours[0].samples} rows, Trainer "
                          f"{theirs[0].samples}")
        r = ratio_of_medians([x.samples_per_s for x in ours], [x.samples_per_s for x in theirs])
        t = ratio_of_medians([x.tokens_per_s for x in ours], [x.tokens_per_s for x in theirs])
        lines.append(f"{method:4s} ours / Trainer  samples/s {r.fmt()}   tokens/s {t.fmt()}")
        verdicts.append(target_verdict(f"{method} ours / Trainer samples/s ({args.grouping})", r,
                                       TARGETS[args.grouping], True))
    lines.append("")
    lines += [accuracy_check(checks, m, by[("ours", m)], by[("trainer", m)], n_eval)
              for m in ("full", "lora")]
    if random_padding is not None:
        left = {i: 1 - sum(r.tokens for r in runs if r.impl == i)
                / sum(r.positions for r in runs if r.impl == i) for i in ("ours", "trainer")}
        lines.append(f"\npadding: random batches {random_padding:.1%} of positions (ours, "
                     f"ungrouped, same rows and seed); length-grouped: ours {left['ours']:.1%}, "
                     f"Trainer {left['trainer']:.1%}; saved {random_padding - left['ours']:.1%} "
                     f"and {random_padding - left['trainer']:.1%} of positions")
    checks.load(load, "during the rounds")
    lines += ["", describe_load(load, "during the rounds"), ""]
    return "\n".join(lines + [checks.verdict("\n".join(verdicts))])


def main(args) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # each load would print a report on the fresh score head
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, data = prepare(args, Path(tmp))
        model = load(args, model_path, data, "full")
        shapes, attention = matmul_shapes(model), model.config._attn_implementation
        del model
        runs, load_reading = run_rounds(args, model_path, data)
    ours = [r for r in runs if r.impl == "ours"]
    rows = round(sum(r.positions for r in ours) / (len(ours) * args.steps))  # per batch
    rate = matmul_rate(shapes, rows, args.threads)
    random_padding = None
    if any(GROUPINGS[args.grouping].values()):
        from tasks.data.collate import make_loader, padding_fraction
        plain = make_loader(data.train, args.batch_size, shuffle=True, seed=args.seed,
                            pad_token_id=data.pad_token_id)
        random_padding = padding_fraction(plain, max_batches=args.steps)
    print(f"\nmodel={args.model or 'tiny (built)'} attention={attention} rows={len(data.train)} "
          f"train / {len(data.eval)} eval, max_length={args.max_length} batch={args.batch_size} "
          f"steps={args.steps} rounds={args.rounds} threads={args.threads} lr={args.lr} "
          f"grouping={args.grouping} ({GROUPINGS[args.grouping]})\n")
    print(report(runs, load_reading, len(data.eval), args, random_padding, shapes, rate))


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: build the tiny one)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grouping", choices=sorted(GROUPINGS), default="defaults",
                    help="length-grouped batches: each side at its default (ours on, Trainer "
                    "off), both, or none")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.06)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


if __name__ == "__main__":
    main(parse())
