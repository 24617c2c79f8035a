"""Speedrun GPT trainer: the 11-layer "paired head attention" NanoGPT speedrun model in one file.

Sections follow the data flow: config, kernels, optimizers, model, data, schedules,
training loop, main(). Importing this module has no side effects; run it with
`python train_gpt.py` (one process) or `torchrun --nproc_per_node=N train_gpt.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# =====================================================================================
# 1. Config
# =====================================================================================

VIRTUAL_RANKS = 8  # every run does the math of 8 ranks: world_size * grad_accum == 8


def next_multiple_of_n(v: int, n: int) -> int:
    return ((v + n - 1) // n) * n


@dataclass
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760
    val_batch_size: int = 4 * 64 * 1024 * 8  # global tokens per validation step
    train_max_seq_len: int = 2048
    # global tokens per step for the three thirds of the scheduled steps; the last one
    # is also used during the extension steps
    train_batch_sizes: tuple = (8 * 2048 * 8, 16 * 2048 * 8, 24 * 2048 * 8)
    # schedule
    num_scheduled_iterations: int = 1735
    num_extension_iterations: int = 40
    cooldown_frac: float = 0.5
    split_embed_frac: float = 2 / 3
    lr_multipliers: tuple = (1.0, 1.52, 1.73)
    lr_final: float = 0.1
    momentum_min: float = 0.85
    momentum_max: float = 0.95
    momentum_warmup_steps: int = 300
    momentum_cooldown_steps: int = 50
    val_loss_every: int = 250  # 0 = only at the end
    # attention windows, in blocks of block_size tokens
    block_size: int = 128
    long_windows: tuple = (3, 7, 11)
    extension_windows: tuple = (6, 13)  # (short, long) during the extension steps
    final_long_window: int = 20  # long window for the final validation (short stays)
    # model
    vocab_size: int = 50257
    num_layers: int = 11
    num_heads: int = 6
    head_dim: int = 128
    model_dim: int = 768
    # optimizers
    muon_lr: float = 0.023
    muon_weight_decay: float = 1.2
    muon_beta2: float = 0.95
    adam_lr: float = 0.008
    adam_eps: float = 1e-10
    adam_weight_decay: float = 0.005
    # run
    seed: int = 0
    run_id: str = ""
    log_dir: str = "logs"
    device: str = "auto"  # auto | cuda | cpu
    attn_backend: str = os.environ.get("TRAIN_GPT_ATTN", "auto")  # auto | fa3 | flex | sdpa
    fp8: str = "auto"  # auto | on | off
    compile: str = "auto"  # auto (on for CUDA) | on | off
    warmup: bool = True  # pre-compile every shape, then reset the state
    preset: str = "record"


PRESETS = {
    "record": {},
    # CPU demo: all 11 layers and every layer-specific feature, on the offline sample corpus
    "tiny": dict(
        train_files="data/sample/sample_train_*.bin",
        val_files="data/sample/sample_val_*.bin",
    ),
}

# =====================================================================================
# 2. Kernels
# =====================================================================================

# --- 2a. Symmetric matmuls for Polar Express (Triton on CUDA, PyTorch elsewhere) ------


# --- 2b. Attention backends (FlashAttention-3, FlexAttention, SDPA) ------------------


# --- 2c. FP8 lm_head ------------------------------------------------------------------


# =====================================================================================
# 3. Optimizers
# =====================================================================================

# =====================================================================================
# 4. Model
# =====================================================================================

# =====================================================================================
# 5. Data
# =====================================================================================
#
# Token shards: a header of HEADER_INTS little-endian int32 ([0] magic, [1] version,
# [2] token count) followed by that many uint16 GPT-2 tokens. Every document starts with
# BOS_ID (<|endoftext|>), so document boundaries can be found by searching for it.
#
# Both generators below yield one optimizer step for this process: a list of
# grad_accum = VIRTUAL_RANKS // world_size tuples (inputs, targets, cu_seqlens), one per
# virtual rank (micro-batch). Process `rank` owns virtual ranks
# rank * grad_accum + j for j in range(grad_accum), so 1, 2, 4 or 8 processes see exactly
# the same data in total and do the same math.

BOS_ID = 50256  # <|endoftext|>: starts every document
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256


def read_shard(path) -> Tensor:
    """Read one token shard and return its tokens as a 1-D uint16 tensor (on CPU).

    The header is checked against the file size so that a truncated download or a
    file of the wrong kind fails here with a clear message instead of training on junk.
    """
    import numpy as np

    path = Path(path)
    size = path.stat().st_size  # raises FileNotFoundError naming the path
    header_bytes = HEADER_INTS * 4
    if size < header_bytes:
        what = "empty" if size == 0 else "shorter than the header"
        raise ValueError(
            f"bad token shard {path}: file is {what} ({size} bytes, "
            f"expected at least the {header_bytes}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(
            f"bad token shard {path}: magic number is {int(header[0])}, expected "
            f"{SHARD_MAGIC} (not a token shard, or a corrupt one)")
    if int(header[1]) != SHARD_VERSION:
        raise ValueError(
            f"bad token shard {path}: version is {int(header[1])}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    expected = header_bytes + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        kind = "truncated" if size < expected else "too long"
        raise ValueError(
            f"bad token shard {path}: file is {kind}: the header says {num_tokens} tokens, "
            f"so {expected} bytes are expected, but the file has {size} bytes")
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=header_bytes)
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def list_shards(pattern) -> list[Path]:
    """Sorted list of the files matching `pattern`; a clear error if there are none."""
    files = sorted(Path(p) for p in glob.glob(str(pattern)))
    if not files:
        raise FileNotFoundError(
            f"no token shards match {str(pattern)!r}. Download FineWeb with "
            f"`python data/cached_fineweb10B.py 9`, or use the bundled sample corpus "
            f"with `--preset tiny` (see data/README.md)")
    return files


def _cu_seqlens_length(tokens_per_rank: int) -> int:
    """Fixed length of cu_seqlens, so the compiled model never sees a new shape."""
    return max(128, next_multiple_of_n(tokens_per_rank // 300, 128))


def _grad_accum_steps(world_size: int) -> int:
    if world_size < 1 or VIRTUAL_RANKS % world_size != 0:
        raise ValueError(f"world_size must divide {VIRTUAL_RANKS}, got {world_size}")
    return VIRTUAL_RANKS // world_size


def _tokens_per_rank(batch_size: int) -> int:
    if batch_size <= 0 or batch_size % VIRTUAL_RANKS != 0:
        raise ValueError(
            f"the global batch size must be a positive multiple of {VIRTUAL_RANKS} "
            f"tokens (one slice per virtual rank), got {batch_size}")
    return batch_size // VIRTUAL_RANKS


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def _pack_cu_seqlens(starts: list, T: int, L: int, state: dict, what: str) -> Tensor:
    """cu_seqlens = sequence starts (first is 0), then T, padded with T to length L.

    With more than L-1 sequences the trailing ones are merged into the last kept
    sequence (they then attend to each other): rare, and it keeps the shape fixed.
    """
    if len(starts) > L - 1:
        if not state.get("warned"):
            import warnings

            warnings.warn(
                f"{what}: a micro-batch of {T} tokens holds {len(starts)} sequences, more "
                f"than the {L - 1} that cu_seqlens (length {L}) can describe; the trailing "
                f"ones are merged into one sequence (warning shown once)", stacklevel=3)
            state["warned"] = True
        starts = starts[:L - 1]
    cu = torch.full((L,), T, dtype=torch.int32)
    cu[:len(starts)] = torch.tensor(starts, dtype=torch.int32)
    return cu


def _to_device(tensors, device) -> tuple:
    """Move CPU tensors to `device`; through pinned memory (async copy) for CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


class _ShardLoader(threading.Thread):
    """Reads one shard and finds its document starts (BOS positions) in the background."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.tokens = self.doc_starts = self.error = None
        self.start()

    def run(self):
        try:
            self.tokens = read_shard(self.path)
            self.doc_starts = (self.tokens == BOS_ID).nonzero().flatten().tolist()
        except BaseException as e:  # re-raised in the training process by result()
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.tokens, self.doc_starts


class _DocumentStream:
    """The documents of all training shards, in order, one at a time.

    A document runs from a BOS to the next BOS or the end of its shard (documents never
    span shards); tokens before the first BOS of a shard are skipped. When a shard is
    opened, the next one starts loading in a background thread.
    """

    def __init__(self, pattern):
        self.pattern = pattern
        self.files = list_shards(pattern)
        self.next_file = 0
        self.pending = _ShardLoader(self.files[0])  # start reading before the first step
        self.shards_used = 0
        self.tokens_used = 0  # tokens in the shards opened so far
        self.tokens, self.starts, self.doc = None, [], 0

    def _open_next_shard(self):
        if self.pending is None:
            raise RuntimeError(
                f"the training data ran out after {self.shards_used} shard(s) / "
                f"{self.tokens_used:,} tokens (files matching {str(self.pattern)!r}). Get "
                f"more with `python data/cached_fineweb10B.py N` (N train shards of 100M "
                f"tokens each; the record needs about 9) or train for fewer steps")
        self.tokens, self.starts = self.pending.result()
        self.doc = 0
        self.shards_used += 1
        self.tokens_used += len(self.tokens)
        self.next_file += 1
        self.pending = (_ShardLoader(self.files[self.next_file])
                        if self.next_file < len(self.files) else None)

    def next_document(self) -> tuple:
        """(tokens of its shard, start, length) of the next document."""
        while self.doc >= len(self.starts):
            self._open_next_shard()
        start = self.starts[self.doc]
        end = self.starts[self.doc + 1] if self.doc + 1 < len(self.starts) else len(self.tokens)
        self.doc += 1
        return self.tokens, start, end - start


def _fill_buffer(docs: _DocumentStream, num_tokens: int, max_seq_len: int) -> list:
    """Take whole documents until exactly `num_tokens` tokens are gathered.

    Returns pieces (tokens, start, length). Each document is cut to max_seq_len tokens
    and the last one to what is left of the buffer; the rest of a cut document is dropped
    (the next buffer starts at a BOS again).
    """
    pieces, need = [], num_tokens
    while need > 0:
        tokens, start, length = docs.next_document()
        take = min(length, max_seq_len, need)
        pieces.append((tokens, start, take))
        need -= take
    return pieces


def train_data_generator(pattern, batch_size: int, rank: int, world_size: int,
                         max_seq_len: int, device="cpu"):
    """BOS-aligned training batches; returns a generator.

    Each next() yields one step for this process: a list of grad_accum tuples
    (inputs int32 (T,), targets int64 (T,), cu_seqlens int32 (L,)) with
    T = batch_size // 8 tokens per virtual rank and L = max(128, next_multiple_of_n(
    T // 300, 128)). For every step the 8 virtual ranks take, in order, disjoint runs
    of consecutive documents; every sequence starts with BOS and has at most
    max_seq_len tokens. `gen.send(new_batch_size)` changes the global batch size, and
    the step it returns already has the new size. Running out of shards raises
    RuntimeError.
    """
    grad_accum = _grad_accum_steps(world_size)
    _check_rank(rank, world_size)
    _tokens_per_rank(batch_size)
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    docs = _DocumentStream(pattern)  # validates the pattern now, not at the first next()
    return _train_steps(docs, batch_size, rank, grad_accum, max_seq_len, device)


def _train_steps(docs, batch_size, rank, grad_accum, max_seq_len, device):
    warn_state = {}
    own = range(rank * grad_accum, (rank + 1) * grad_accum)
    while True:
        T = _tokens_per_rank(batch_size)
        L = _cu_seqlens_length(T)
        step = []
        # every process walks through the documents of all 8 virtual ranks so that it
        # knows where its own start, but only builds the tensors of its own ones
        for v in range(VIRTUAL_RANKS):
            pieces = _fill_buffer(docs, T + 1, max_seq_len)
            if v not in own:
                continue
            buf = torch.cat([tokens[s:s + n] for tokens, s, n in pieces])
            starts, offset = [], 0
            for _, _, n in pieces:
                if offset < T:  # a sequence starting at T lives only in the targets
                    starts.append(offset)
                offset += n
            cu = _pack_cu_seqlens(starts, T, L, warn_state, "train_data_generator")
            inputs = buf[:-1].to(torch.int32)
            targets = buf[1:].to(torch.int64)
            step.append(_to_device((inputs, targets, cu), device))
        new_batch_size = yield step
        if new_batch_size is not None:
            batch_size = new_batch_size


def val_data_generator(pattern, batch_size: int, rank: int, world_size: int, device="cpu"):
    """Validation batches: contiguous, NOT aligned slices of the val shards.

    The val shards are concatenated in order; step s covers the global tokens
    [s*B, (s+1)*B) and virtual rank v gets the T = B // 8 inputs starting at s*B + v*T
    (plus one more token for the last target). cu_seqlens marks 0 and every BOS inside
    the slice, then T, padded to the same fixed length as in training. Yields lists of
    grad_accum tuples like train_data_generator; raises ValueError when the val data is
    too short for the next step.
    """
    grad_accum = _grad_accum_steps(world_size)
    _check_rank(rank, world_size)
    T = _tokens_per_rank(batch_size)
    files = list_shards(pattern)
    return _val_steps(files, pattern, batch_size, T, rank, grad_accum, device)


def _val_steps(files, pattern, B, T, rank, grad_accum, device):
    L = _cu_seqlens_length(T)
    warn_state = {}
    tokens = torch.empty(0, dtype=torch.uint16)
    next_file = 0
    step = 0
    while True:
        needed = (step + 1) * B + 1  # +1: the target of the last input
        while len(tokens) < needed and next_file < len(files):
            tokens = torch.cat([tokens, read_shard(files[next_file])])
            next_file += 1
        if len(tokens) < needed:
            raise ValueError(
                f"not enough validation data for val step {step}: it needs {needed:,} "
                f"tokens but the files matching {str(pattern)!r} have {len(tokens):,} "
                f"(use fewer val tokens or a smaller val batch size)")
        out = []
        for j in range(grad_accum):
            v = rank * grad_accum + j
            start = step * B + v * T
            buf = tokens[start:start + T + 1]
            inputs = buf[:-1].to(torch.int32)
            targets = buf[1:].to(torch.int64)
            bos = (inputs[1:] == BOS_ID).nonzero().flatten() + 1
            cu = _pack_cu_seqlens([0] + bos.tolist(), T, L, warn_state, "val_data_generator")
            out.append(_to_device((inputs, targets, cu), device))
        yield out
        step += 1


# =====================================================================================
# 6. Schedules
# =====================================================================================

# =====================================================================================
# 7. Training loop
# =====================================================================================

# =====================================================================================
# 8. main
# =====================================================================================


def main(argv=None):
    raise NotImplementedError


if __name__ == "__main__":
    main()
