#!/usr/bin/env bash
# Train the Parallax speedrun on the GPUs of this node (torchrun, one process per GPU).
# Settings pass through the environment (see the top of train_gpt.py), for example:
#   ./run.sh                                   # the record configuration on FineWeb
#   ATTENTION=softmax SEED=1 ./run.sh          # the softmax baseline
#   TRAIN_FILES='corpus/text_train_*.bin' VAL_FILES='corpus/text_val_*.bin' VAL_TOKENS=1048576 ./run.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# GPUs first, so that a machine without one fails before any download. Every one, up to 8; the world
# size must divide 8 (gradient accumulation makes up the rest).
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [[ "$gpus" -eq 0 ]]; then
    echo "error: no NVIDIA GPU found (nvidia-smi -L lists none). To check the install on a CPU instead:" \
        "SMOKE=1 $PYTHON train_gpt.py (with data shards present)" >&2
    exit 1
fi
for nproc in 8 4 2 1; do
    if ((gpus >= nproc)); then
        break
    fi
done
if ((nproc != gpus)); then
    echo "using $nproc of the $gpus GPUs (the world size must divide 8)"
fi

# Data: without TRAIN_FILES, train on FineWeb, fetching its shards when they are not here yet.
if [[ -z "${TRAIN_FILES:-}" ]]; then
    if ! compgen -G "data/fineweb10B/fineweb_train_*.bin" >/dev/null \
        || ! compgen -G "data/fineweb10B/fineweb_val_*.bin" >/dev/null; then
        echo "no FineWeb shards in data/fineweb10B/: fetching them (python data/cached_fineweb10B.py)"
        "$PYTHON" data/cached_fineweb10B.py
    fi
fi

if command -v torchrun >/dev/null 2>&1; then
    exec torchrun --standalone --nproc_per_node="$nproc" train_gpt.py
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" train_gpt.py
