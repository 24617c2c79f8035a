#!/usr/bin/env bash
# Main command. With GPUs: the record run on all visible GPUs through torchrun
# (multi-node when NNODES, NODE_RANK and MASTER_ADDR are set). Without GPUs: the tiny
# CPU demo on the offline sample corpus (multi-node too, over gloo). Extra arguments go to
# train_gpt.py. NPROC_PER_NODE (1, 2, 4 or 8) sets the number of processes per node: GPUs,
# or CPU demo processes. RUN_SH_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
nproc=${NPROC_PER_NODE:-}
case "$nproc" in
    ""|1|2|4|8) ;;
    *) echo "run.sh: NPROC_PER_NODE=${nproc}: expected 1, 2, 4 or 8 (processes per node; the world size must divide 8)" >&2
       exit 2 ;;
esac
nnodes=${NNODES:-1}
case "$nnodes" in
    [1-8]) ;;
    *) echo "run.sh: NNODES=${nnodes}: expected 1 to 8 nodes (the world size must divide 8)" >&2
       exit 2 ;;
esac
ngpu=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
preset=()
if [ "$ngpu" -eq 0 ]; then
    data="the offline sample corpus"
    case " $* " in *" --train_files"*) data="your --train_files" ;; esac
    nproc=${nproc:-1}
    preset=(--preset tiny)
    what="no GPU found: the tiny CPU demo on ${data}"
    # the CPU step allocates and frees (T, V) tensors of tens to hundreds of MB: glibc's malloc
    # would hand them back to the kernel on each free and fault them in again (a quarter of
    # the run's time); keep freed memory for reuse instead. The numbers are the same, and
    # other C libraries ignore the variable
    export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647}
else
    if [ "$nproc" != "" ] && [ "$nproc" -gt "$ngpu" ]; then
        echo "run.sh: NPROC_PER_NODE=${nproc} but this node has ${ngpu} GPU(s)" >&2
        exit 2
    fi
    nproc=${nproc:-$ngpu}
    what="${ngpu} GPU(s) found"
fi
if [ "$nnodes" -gt 1 ]; then
    : "${NODE_RANK:?set NODE_RANK for a multi-node run}" "${MASTER_ADDR:?set MASTER_ADDR for a multi-node run}"
    echo "run.sh: ${what}; node ${NODE_RANK} of ${nnodes} x ${nproc} process(es), rendezvous at ${MASTER_ADDR}:${MASTER_PORT:-29500}"
    cmd=("$PYTHON" -m torch.distributed.run --nnodes="$nnodes" --node_rank="$NODE_RANK" --nproc_per_node="$nproc"
         --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" train_gpt.py "${preset[@]}" "$@")
elif [ "$ngpu" -eq 0 ] && [ "$nproc" -eq 1 ]; then
    echo "run.sh: ${what} (python train_gpt.py --preset tiny)"
    cmd=("$PYTHON" train_gpt.py "${preset[@]}" "$@")
else
    echo "run.sh: ${what}: torchrun --standalone --nproc_per_node=${nproc} train_gpt.py ${preset[*]} $*"
    cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" train_gpt.py "${preset[@]}" "$@")
fi
if [ -n "${RUN_SH_DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
