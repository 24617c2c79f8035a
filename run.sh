#!/usr/bin/env bash
# Main command. With GPUs: the record run on all visible GPUs through torchrun
# (multi-node when NNODES, NODE_RANK and MASTER_ADDR are set). Without GPUs: the tiny
# CPU demo on the offline sample corpus. Extra arguments go to train_gpt.py.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
ngpu=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
if [ "$ngpu" -gt 0 ]; then
    if [ -n "${NNODES:-}" ] && [ "${NNODES}" -gt 1 ]; then
        : "${NODE_RANK:?set NODE_RANK for a multi-node run}" "${MASTER_ADDR:?set MASTER_ADDR for a multi-node run}"
        echo "run.sh: ${NNODES} nodes x ${ngpu} GPUs (node ${NODE_RANK}, master ${MASTER_ADDR})"
        exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$ngpu" \
            --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" train_gpt.py "$@"
    fi
    echo "run.sh: ${ngpu} GPU(s) found: torchrun --standalone --nproc_per_node=${ngpu} train_gpt.py $*"
    exec torchrun --standalone --nproc_per_node="$ngpu" train_gpt.py "$@"
fi
echo "run.sh: no GPU found: running the tiny CPU demo (python train_gpt.py --preset tiny) on the offline sample corpus"
exec "$PYTHON" train_gpt.py --preset tiny "$@"
