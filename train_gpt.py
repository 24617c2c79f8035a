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
