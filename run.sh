#!/usr/bin/env bash
# Main command. With GPUs: the record run on all visible GPUs through torchrun
# (multi-node when NNODES, NODE_RANK and MASTER_ADDR are set). Without GPUs: the tiny
# CPU demo on the offline sample corpus. Extra arguments go to train_gpt.py.
# NPROC_PER_NODE (1, 2, 4 or 8) sets the number of processes: GPUs, or CPU demo processes.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
nproc=${NPROC_PER_NODE:-}
case "$nproc" in
    ""|1|2|4|8) ;;
    *) echo "run.sh: NPROC_PER_NODE=${nproc}: expected 1, 2, 4 or 8 (processes per node; the world size must divide 8)" >&2
       exit 2 ;;
esac
ngpu=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$ngpu" -eq 0 ]; then
    data="the offline sample corpus"
    case " $* " in *" --train_files"*) data="your --train_files" ;; esac
    if [ -n "$nproc" ] && [ "$nproc" -gt 1 ]; then
        echo "run.sh: no GPU found: running the tiny CPU demo on ${nproc} processes (torchrun, gloo) on ${data}"
        exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" train_gpt.py --preset tiny "$@"
    fi
    echo "run.sh: no GPU found: running the tiny CPU demo (python train_gpt.py --preset tiny) on ${data}"
    exec "$PYTHON" train_gpt.py --preset tiny "$@"
fi
if [ -n "$nproc" ] && [ "$nproc" -gt "$ngpu" ]; then
    echo "run.sh: NPROC_PER_NODE=${nproc} but this node has ${ngpu} GPU(s)" >&2
    exit 2
fi
nproc=${nproc:-$ngpu}
if [ -n "${NNODES:-}" ] && [ "${NNODES}" -gt 1 ]; then
    : "${NODE_RANK:?set NODE_RANK for a multi-node run}" "${MASTER_ADDR:?set MASTER_ADDR for a multi-node run}"
    echo "run.sh: ${NNODES} nodes x ${nproc} GPUs (node ${NODE_RANK}, master ${MASTER_ADDR})"
    exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$nproc" \
        --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" train_gpt.py "$@"
fi
echo "run.sh: ${ngpu} GPU(s) found: torchrun --standalone --nproc_per_node=${nproc} train_gpt.py $*"
exec torchrun --standalone --nproc_per_node="$nproc" train_gpt.py "$@"
