#!/usr/bin/env bash
# GPU check for issue #11, for a machine with a CUDA GPU and no internet. From the repo root:
#
#     benchmarks/gpu_check.sh OUT_DIR
#
# Writes OUT_DIR/gpu_check.md (the summary: versions, the two tables, every skip and failure)
# and OUT_DIR/*.log (full output of each step). About 4-6 minutes on an H200.
#   (a) benchmarks/adapters.py at GPT-2-large shape, bf16 on CUDA: ours vs HF peft, LoRA, DoRA
#       and QLoRA (time per step with spread, peak memory). Random weights: nothing to download.
#   (b) benchmarks/cuda_smoke.py: the pipeline's train/eval path on a tiny local model built
#       from the data, bf16 autocast, bitsandbytes NF4 on CUDA, peak memory, finite losses.
#
# Needs (nothing is fetched):
#   - python ($PYTHON; default .venv/bin/python if present, else python3) with a CUDA build of
#     torch, transformers >= 5, peft (for (a)), bitsandbytes with CUDA kernels (for QLoRA), and
#     the project's own dependencies from pyproject.toml (pydantic, prefect, pandas, scipy,
#     psutil, scikit-learn, ...: tasks/ and peft_modules/ import them).
#   - SST-2 as train.tsv / validation.tsv (columns sentence, label) at ../shared/data/sst2, or
#     in the folder $DATA names (for (b): it trains the tiny model's tokenizer and its rows).
# Whatever is missing is skipped with a line saying so; the script exits 0 unless a step that
# ran failed.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR   (run from the repository root)" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SUMMARY="$OUT/gpu_check.md"
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DATA=${DATA:-../shared/data/sst2}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }
py_ok() { "$PYTHON" -c "$1" >/dev/null 2>&1; }

: >"$SUMMARY"
say "# GPU check (issue #11)"
say ""
say "$(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git') on $(hostname)"
if ! py_ok "import torch"; then
    say "no torch in $PYTHON: skipping everything"
    exit 0
fi
say "$("$PYTHON" - <<'EOF' 2>/dev/null
from importlib import metadata
import torch
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"
v = {m: version(m) for m in ("transformers", "peft", "bitsandbytes", "prefect", "pydantic")}
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: {gpu}; "
      + ", ".join(f"{k} {x}" for k, x in v.items()))
EOF
)"
if ! py_ok "import torch; assert torch.cuda.is_available()"; then
    say "no CUDA device: skipping (a) adapters at GPT-2-large shape and (b) cuda_smoke"
    exit 0
fi

# Does bitsandbytes quantise on this GPU? Decides whether (a) includes QLoRA.
BNB_PROBLEM=$("$PYTHON" -c "
import sys; sys.path.insert(0, 'benchmarks')
from cuda_smoke import bnb_cuda_problem
print(bnb_cuda_problem() or '')" 2>&1 | tail -n 1)

say ""
say "## (a) adapters.py --shape large --dtype bfloat16 --device cuda"
say ""
if ! py_ok "import peft"; then
    say "peft not installed: skipping (a) (it compares our adapters with peft's)"
elif ! py_ok "import peft_modules, benchmarks._noise, tasks.training.machine_load"; then
    say "the project's dependencies are missing (import peft_modules/_noise failed): skipping (a)"
else
    METHODS=lora,dora,qlora
    if [ -n "$BNB_PROBLEM" ]; then
        say "$BNB_PROBLEM: skipping qlora in (a)"
        METHODS=lora,dora
    fi
    # 12 interleaved steps after 3 warm-ups, one memory run each: about 3 minutes on an H200,
    # most of it building and loading the 774M-parameter model in 9 subprocesses.
    if timeout 270 "$PYTHON" benchmarks/adapters.py --shape large --dtype bfloat16 --device cuda \
        --methods "$METHODS" --batch 8 --seq 128 --steps 12 --warmup 3 --mem-reps 1 \
        >"$OUT/adapters_large.log" 2>&1; then
        sed -n '/^shape=/,$p' "$OUT/adapters_large.log" >>"$SUMMARY"
        echo "(a) done"
    else
        say "(a) FAILED (exit $?); the end of $OUT/adapters_large.log:"
        tail -n 15 "$OUT/adapters_large.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    fi
fi

say ""
say "## (b) cuda_smoke.py: tiny model, bf16 autocast, NF4 on CUDA"
say ""
if [ ! -f "$DATA/train.tsv" ] || [ ! -f "$DATA/validation.tsv" ]; then
    say "no SST-2 at $DATA: (b) uses synthetic SST-2-shaped data (benchmarks/synthetic_sst2.py);"
    say "its accuracies check the code path only"
    DATA=$(mktemp -d)/synthetic-sst2
    "$PYTHON" benchmarks/synthetic_sst2.py "$DATA" >/dev/null
fi
if [ ! -f "$DATA/train.tsv" ]; then
    say "no data: skipping (b)"
elif ! py_ok "import tasks.train, tasks.evaluate, tasks.prepare, tasks.load"; then
    say "the pipeline's dependencies are missing: skipping (b):"
    "$PYTHON" -c "import tasks.train, tasks.evaluate, tasks.prepare, tasks.load" 2>&1 | tail -n 1 \
        | sed 's/^/    /' | tee -a "$SUMMARY"
else
    if timeout 110 "$PYTHON" benchmarks/cuda_smoke.py --data "$DATA" --steps 20 \
        --out "$OUT/cuda_smoke.md" >"$OUT/cuda_smoke.log" 2>&1; then
        cat "$OUT/cuda_smoke.md" >>"$SUMMARY"
        echo "(b) done"
    else
        say "(b) FAILED (exit $?); the end of $OUT/cuda_smoke.log:"
        tail -n 15 "$OUT/cuda_smoke.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    fi
fi
say ""
say "## (c) adapters.py --shape small, bf16, batch 32 x 64: a GPT-2 (124M) step, for sweep costs"
say ""
if py_ok "import peft, peft_modules, benchmarks._noise"; then
    if timeout 110 "$PYTHON" benchmarks/adapters.py --shape small --dtype bfloat16 --device cuda \
        --methods lora,dora --batch 32 --seq 64 --steps 20 --warmup 5 --mem-reps 1 \
        >"$OUT/adapters_small.log" 2>&1; then
        sed -n '/^shape=/,$p' "$OUT/adapters_small.log" >>"$SUMMARY"
        echo "(c) done"
    else
        say "(c) FAILED (exit $?); the end of $OUT/adapters_small.log:"
        tail -n 15 "$OUT/adapters_small.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    fi
else
    say "peft or the project's dependencies are missing: skipping (c)"
fi
say ""
say "## (d) 2-GPU DDP: the tiny model, LoRA and full, 2 ranks under torchrun (nccl)"
say ""
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -lt 2 ]; then
    say "skipped: this machine has ${NGPU:-0} GPU(s); the 2-GPU DDP step needs 2"
elif [ ! -f "$DATA/train.tsv" ]; then
    say "no data: skipping (d)"
else
    D=$(mktemp -d)
    "$(dirname "$PYTHON")/peft-bench" make-tiny-model "$D/tiny" --data "$DATA" >/dev/null 2>&1 || true
    cat >"$D/ddp.yaml" <<YAML
name: gpu-ddp
model: {name_or_path: $D/tiny}
data: {source: $DATA, train_size: 512, eval_size: 128, max_length: 64}
methods: [{name: full, method: full}, {name: lora, method: lora, rank: 8, alpha: 16, targets: [c_attn]}]
training: {epochs: 1, batch_size: 16, device: cuda, checkpoint_every: null, distributed: {nproc_per_node: 2}}
tracking: {tracking_uri: "sqlite:///$D/mlflow.db"}
report: {output_dir: $D/reports}
YAML
    if timeout 300 "$(dirname "$PYTHON")/peft-bench" run "$D/ddp.yaml" >"$OUT/ddp.log" 2>&1; then
        grep -E "✓|│ (full|lora) " "$OUT/ddp.log" >>"$SUMMARY"
        echo "(d) done"
    else
        say "(d) FAILED (exit $?); the end of $OUT/ddp.log:"
        tail -n 15 "$OUT/ddp.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    fi
fi
say ""
say "summary written to $SUMMARY"
exit $FAILED
