"""A synthetic stand-in for SST-2 (same files and columns) for machines without the real data,
such as a lent GPU machine with no network: sentences of neutral words with a few sentiment
words, labelled by which kind dominates. Good for timing and for checking code paths; its
accuracies say nothing about SST-2.

    python benchmarks/synthetic_sst2.py OUT_DIR [--train 20000]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

POSITIVE = "good great moving charming funny brilliant warm clever tender vivid".split()
NEGATIVE = "bad dull boring clumsy flat tedious weak messy cold stale".split()
NEUTRAL = ("the a film movie story plot actor scene this it is was its with and of to in "
           "director script music ending cast year character moment").split()


def sentence(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    major, minor = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 28))]
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(major))
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), rng.choice(minor))
    return " ".join(words), label


def write(path: Path, n: int, rng: random.Random) -> None:
    rows = [sentence(rng) for _ in range(n)]
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=20000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", args.train), ("validation", 872), ("test", 1821)):
        write(out / f"{split}.tsv", n, rng)
    print(f"synthetic SST-2-shaped data in {out}")


if __name__ == "__main__":
    main()
