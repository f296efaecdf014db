"""A tiny, randomly initialised GPT-2 with its own byte-level BPE tokenizer, built from local
SST-2 text in a few seconds.

It exists so tests and smoke runs exercise the real loading path (`from_pretrained` on a folder,
`AutoModelForSequenceClassification` adding a fresh `score` head, the same as for the real
`openai-community/gpt2`) without reaching the Hugging Face Hub. Its accuracy means nothing: the
config carries `peft_bench_random_init = True` so a report can say so.

    python -m tasks.models.tiny OUT_DIR [DATA_DIR]
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Optional

EOS = "<|endoftext|>"


def _read_sentences(path: Path, column: str, limit: Optional[int]) -> list[str]:
    """The `column` of a header-first TSV; quoting off, as GLUE text holds bare quotes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training text for the tiny tokenizer not found")
    sentences: list[str] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        if column not in header:
            raise ValueError(f"{path}: no column {column!r} (columns present: {header})")
        at = header.index(column)
        for row in reader:
            if limit is not None and len(sentences) >= limit:
                break
            if len(row) > at and row[at].strip():
                sentences.append(row[at])
    if not sentences:
        raise ValueError(f"{path}: no text in column {column!r} to train a tokenizer on")
    return sentences


def train_tokenizer(sentences: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE as GPT-2 uses, wrapped as a transformers fast tokenizer whose bos, eos,
    unk and pad are all `<|endoftext|>` (GPT-2 has no pad token; eos-as-pad is the convention)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()  # byte-level: no unknown tokens, any UTF-8 text encodes
    bpe.train_from_iterator(sentences, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS, model_max_length=model_max_length)


def make_tiny_model(out_dir: Path, data_dir: Path, vocab_size: int = 1024, n_layer: int = 2,
                    n_embd: int = 64, n_head: int = 2, n_positions: int = 128, seed: int = 0,
                    max_train_lines: Optional[int] = 20000) -> Path:
    """Write a random `GPT2LMHeadModel` + tokenizer to `out_dir` (safetensors) and return it.

    The tokenizer trains on the `sentence` column of `data_dir/train.tsv` (first
    `max_train_lines` rows; None = all). Same arguments and data give the same weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir, data_dir = Path(out_dir), Path(data_dir)
    sentences = _read_sentences(data_dir / "train.tsv", "sentence", max_train_lines)
    tokenizer = train_tokenizer(sentences, vocab_size, n_positions)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=eos_id,
                        eos_token_id=eos_id, pad_token_id=eos_id)
    # An extra config attribute survives save/load, so whoever loads the folder can tell.
    config.peft_bench_random_init = True
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m tasks.models.tiny OUT_DIR [DATA_DIR]  "
                 "(DATA_DIR defaults to ../shared/data/sst2)")
    data = Path(sys.argv[2]) if len(sys.argv) == 3 else Path("../shared/data/sst2")
    print(make_tiny_model(Path(sys.argv[1]), data))
