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
# Polar Express needs A = X X^T and B = b*A + c*A@A with A symmetric. Both results are
# symmetric, so the kernels compute only the tiles on and below the diagonal and write each
# off-diagonal tile a second time, transposed, into the mirror position. For a symmetric A,
# A@A = A@A^T, so both kernels read rows of A for both operands. They accumulate in fp32
# and store in the output's dtype.
try:
    import triton
    import triton.language as tl
except Exception:  # no Triton: the PyTorch fallback below is used everywhere
    triton = None
    tl = None

# The Triton CPU interpreter must be chosen before triton is imported, so this is read once.
# It has no driver (autotuning cannot benchmark there) and mishandles bf16 operands.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET_META = dict(BLOCK_M=32, BLOCK_K=32)  # the one fixed config used when interpreting

if triton is not None:

    def _sym_autotune(kernel):
        if _TRITON_INTERPRET:
            return kernel
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [
                (128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3),
            ]
        ]
        return triton.autotune(configs=configs, key=["M", "K"])(kernel)

    @triton.jit
    def _sym_tile_ids(M, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        tiles = tl.cdiv(M, BLOCK_M)
        return tl.program_id(1).to(tl.int64), pid // tiles, pid % tiles

    @triton.jit
    def _sym_tile_rows_dot(A, M, K, stride_am, stride_ak, pid_m, pid_n,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 tile (rows pid_m, cols pid_n) of A @ A^T, A being an (M, K) matrix."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = A + offs_n[None, :] * stride_am + offs_k[:, None] * stride_ak  # A^T tile
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < M), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_ak
        return acc

    @triton.jit
    def _sym_tile_store(C, acc, M, stride_cm, stride_cn, pid_m, pid_n, BLOCK_M: tl.constexpr):
        """Store tile (pid_m, pid_n) and, off the diagonal, its transpose at (pid_n, pid_m)."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        out = acc.to(C.dtype.element_ty)
        tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, out,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < M))
        if pid_m != pid_n:
            tl.store(C + offs_n[:, None] * stride_cm + offs_m[None, :] * stride_cn, tl.trans(out),
                     mask=(offs_n[:, None] < M) & (offs_m[None, :] < M))

    @_sym_autotune
    @triton.jit
    def _xxt_kernel(A, C, M, K, stride_ab, stride_am, stride_ak, stride_cb, stride_cm, stride_cn,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        batch, pid_m, pid_n = _sym_tile_ids(M, BLOCK_M)
        if pid_n > pid_m:  # upper triangle: written by the mirrored tile
            return
        A += batch * stride_ab
        C += batch * stride_cb
        acc = _sym_tile_rows_dot(A, M, K, stride_am, stride_ak, pid_m, pid_n, BLOCK_M, BLOCK_K, UPCAST)
        _sym_tile_store(C, acc, M, stride_cm, stride_cn, pid_m, pid_n, BLOCK_M)

    @_sym_autotune
    @triton.jit
    def _ba_plus_caa_kernel(A, C, M, K, stride_ab, stride_am, stride_ak, stride_cb, stride_cm, stride_cn,
                            alpha, beta,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        batch, pid_m, pid_n = _sym_tile_ids(M, BLOCK_M)
        if pid_n > pid_m:
            return
        A += batch * stride_ab
        C += batch * stride_cb
        acc = _sym_tile_rows_dot(A, M, K, stride_am, stride_ak, pid_m, pid_n, BLOCK_M, BLOCK_K, UPCAST)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        a_tile = tl.load(A + offs_m[:, None] * stride_am + offs_n[None, :] * stride_ak,
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < M), other=0.0)
        acc = acc * beta + a_tile.to(tl.float32) * alpha
        _sym_tile_store(C, acc, M, stride_cm, stride_cn, pid_m, pid_n, BLOCK_M)


def _as_batched(t: Tensor) -> Tensor:
    return t if t.ndim == 3 else t.unsqueeze(0)


def _launch_sym(kernel, A: Tensor, out: Tensor, *scalars) -> Tensor:
    A3, C3 = _as_batched(A), _as_batched(out)
    batch, M, K = A3.shape
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) ** 2, batch)  # noqa: E731
    meta = _INTERPRET_META if _TRITON_INTERPRET else {}
    kernel[grid](A3, C3, M, K, *A3.stride(), *C3.stride(), *scalars, UPCAST=_TRITON_INTERPRET, **meta)
    return out


def XXT(A: Tensor, out: Tensor) -> Tensor:
    """Triton: out = A @ A^T for A of shape (m, n) or (B, m, n); out is (m, m) or (B, m, m)."""
    return _launch_sym(_xxt_kernel, A, out)


def ba_plus_cAA(A: Tensor, alpha: float, beta: float, out: Tensor) -> Tensor:
    """Triton: out = alpha * A + beta * A @ A for a symmetric A of shape (m, m) or (B, m, m)."""
    return _launch_sym(_ba_plus_caa_kernel, A, out, alpha, beta)


def _use_sym_triton(A: Tensor, force_triton: bool) -> bool:
    if force_triton:  # tests: the Triton kernels on CPU tensors under TRITON_INTERPRET=1
        if triton is None or not (A.is_cuda or _TRITON_INTERPRET):
            raise RuntimeError("force_triton needs Triton and a CUDA tensor or TRITON_INTERPRET=1")
        return True
    return A.is_cuda and triton is not None


def sym_xxt(A: Tensor, out: Tensor | None = None, force_triton: bool = False) -> Tensor:
    """A @ A^T (batched over a leading dim if A is 3-D): Triton on CUDA, PyTorch otherwise."""
    if _use_sym_triton(A, force_triton):
        if out is None:
            out = A.new_empty(*A.shape[:-1], A.size(-2))
        return XXT(A, out)
    return torch.matmul(A, A.mT, out=out)


def sym_ba_plus_caa(A: Tensor, b: float, c: float, out: Tensor | None = None,
                    force_triton: bool = False) -> Tensor:
    """b * A + c * A @ A for a symmetric A (2-D or batched 3-D): Triton on CUDA, PyTorch otherwise."""
    if _use_sym_triton(A, force_triton):
        return ba_plus_cAA(A, b, c, torch.empty_like(A) if out is None else out)
    return (torch.baddbmm if A.ndim == 3 else torch.addmm)(A, A, A, beta=b, alpha=c, out=out)


# --- 2b. Attention backends (FlashAttention-3, FlexAttention, SDPA) ------------------


# --- 2c. FP8 lm_head ------------------------------------------------------------------


# =====================================================================================
# 3. Optimizers
# =====================================================================================
# Every parameter carries a `label` attribute set by the model; it routes the parameter to
# NorMuon (the (4d, d) matrices) or to Adam (everything else) and picks its hyperparameters.

# Polar Express (SPEC 3.3): (a, b, c) per iteration.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# NorMuon labels -> lr_mul. 'attn' is the packed qkvo matrix, orthogonalized as 4 blocks of rows.
MUON_LR_MUL = {"attn": 1.0, "mlp_fc": 1.0, "mlp_proj": 2.0}

# Adam labels -> (beta1, beta2), lr_mul, wd_mul.
ADAM_LABELS = {
    "lm_head":        dict(betas=(0.5, 0.95), lr_mul=1.0, wd_mul=150.0),
    "embed":          dict(betas=(0.5, 0.95), lr_mul=1.0, wd_mul=150.0),
    "value_embed":    dict(betas=(0.75, 0.95), lr_mul=75.0, wd_mul=5.0),
    "attn_gate_bank": dict(betas=(0.9, 0.99), lr_mul=1.0, wd_mul=1.0),
    "ve_gate_bank":   dict(betas=(0.9, 0.99), lr_mul=1.0, wd_mul=1.0),
    "smear_gate":     dict(betas=(0.9, 0.99), lr_mul=0.01, wd_mul=0.0),
    "skip_gate":      dict(betas=(0.9, 0.99), lr_mul=0.05, wd_mul=0.0),
    "scalars":        dict(betas=(0.9, 0.99), lr_mul=5.0, wd_mul=0.0),
    "x0_lambda":      dict(betas=(0.65, 0.95), lr_mul=5.0, wd_mul=0.0),
}
ADAM_SHARD_MIN_NUMEL = 1024  # smaller Adam tensors are all-reduced and updated on every rank


def polar_express(G: Tensor) -> Tensor:
    """Approximate polar factor U V^T of G (2-D, or batched over a leading dim), SPEC 3.3.

    Works in G's dtype (the caller casts: bf16 on GPU as in the record; NorMuon uses fp32 on
    CPU, where bf16 matmuls are slow). The Frobenius norm is taken in fp32 (fp64 for fp64).
    """
    X = G if G.ndim == 3 else G.unsqueeze(0)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True,
                                    dtype=torch.float64 if G.dtype == torch.float64 else torch.float32)
    X = (X / (norm * 1.02 + 1e-6)).to(G.dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X.contiguous()
    batch, m, _ = X.shape
    A = X.new_empty(batch, m, m)
    B = X.new_empty(batch, m, m)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        sym_xxt(X, out=A)
        sym_ba_plus_caa(A, b, c, out=B)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if tall:
        X = X.mT
    return X if G.ndim == 3 else X.squeeze(0)


def fp32_from_bf16_and_mantissa(p: Tensor, mantissa: Tensor) -> Tensor:
    """fp32 tensor whose top 16 bits are the bf16 `p` and low 16 bits the uint16 `mantissa`."""
    hi = p.view(torch.int16).to(torch.int32) << 16
    lo = mantissa.view(torch.int16).to(torch.int32) & 0xFFFF
    return (hi | lo).view(torch.float32)


def split_fp32_to_bf16_and_mantissa(x: Tensor, p_out: Tensor, mantissa_out: Tensor) -> None:
    """Inverse of fp32_from_bf16_and_mantissa: p_out gets the top 16 bits of fp32 `x`
    (truncation, not rounding) and mantissa_out the low 16 bits."""
    bits = x.view(torch.int32)
    p_out.copy_((bits >> 16).to(torch.int16).view(torch.bfloat16))
    mantissa_out.copy_(bits.to(torch.int16).view(torch.uint16))


def muon_groups(kinds: list[str], world_size: int, packed: bool | None = None) -> list[list[int | None]]:
    """Communication groups for NorMuon. kinds[i] is 'attn' or 'mlp' for Muon matrix i.

    Each group lists matrix indices (None = a zero pad) and has a length that is a multiple of
    world_size; rank r owns the r-th of the world_size equal consecutive chunks.
    packed (default: world_size == 8, when possible): groups of 2 * world_size taken in kind
    order (all 'attn' first), so every rank gets 2 matrices of one kind and nothing is padded
    (10 attn + 22 mlp on 8 ranks: [10 attn + 6 mlp], [16 mlp]). Otherwise one group per kind,
    padded with None at its end to a multiple of world_size.
    """
    by_kind = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in ("attn", "mlp")}
    if set(kinds) - set(by_kind):
        raise ValueError(f"unknown Muon kinds {sorted(set(kinds) - set(by_kind))}")
    size = 2 * world_size
    feasible = all(len(v) % 2 == 0 for v in by_kind.values()) and len(kinds) % size == 0
    if packed is None:
        packed = world_size == 8 and feasible
    if packed:
        if not feasible:
            raise ValueError(f"cannot pack {({k: len(v) for k, v in by_kind.items()})} matrices "
                             f"into groups of {size} with 2 of one kind per rank")
        order = by_kind["attn"] + by_kind["mlp"]
        return [order[i:i + size] for i in range(0, len(order), size)]
    return [v + [None] * (-len(v) % world_size) for v in by_kind.values() if v]


def orthogonalize_update(u: Tensor, attn: bool) -> Tensor:
    """Polar Express of a stack of updates (n, rows, cols); attention qkvo updates as four
    separate (rows/4, cols) blocks of rows (Q, K, V, O)."""
    if not attn:
        return polar_express(u)
    n, rows, cols = u.shape
    return polar_express(u.reshape(n * 4, rows // 4, cols)).reshape(n, rows, cols)


@dataclass
class _MuonGroup:
    members: list  # matrix indices, None = zero pad
    per_rank: int
    mine: list  # this rank's real matrices (they lead its chunk; pads come last)
    attn: bool  # this rank's matrices are attention qkvo (orthogonalized as 4 blocks)
    momentum: Tensor  # (n, rows, cols) fp32
    second_moment: Tensor  # (n, rows, 1) per-row, or (n, 1, cols) when wider than tall; fp32
    mantissa: Tensor | None  # (n, rows, cols) uint16 low bits of the fp32 master (bf16 params)
    lr_scale: Tensor  # (n, 1, 1) fp32: max(1, rows/cols)^0.5 * lr_mul


class NorMuon:
    """NorMuon (SPEC 3, items 1-7) for equally-shaped 2-D matrices, each rank updating its chunk.
    The (scheduled) lr and momentum are given to each step.

    ortho_dtype: dtype of the Polar Express work (default bf16 on CUDA, fp32 elsewhere).
    """

    def __init__(self, params: list[Tensor], labels: list[str], weight_decay: float, beta2: float,
                 rank: int = 0, world_size: int = 1, packed: bool | None = None,
                 ortho_dtype: torch.dtype | None = None):
        self.params, self.labels = list(params), list(labels)
        self.weight_decay, self.beta2 = weight_decay, beta2
        self.rank, self.world_size = rank, world_size
        self.groups: list[_MuonGroup] = []
        if not self.params:
            return
        device = self.params[0].device
        self.ortho_dtype = ortho_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        kinds = ["attn" if label == "attn" else "mlp" for label in self.labels]
        for members in muon_groups(kinds, world_size, packed):
            real = [self.params[i] for i in members if i is not None]
            if any(p.shape != real[0].shape or p.dtype != real[0].dtype or p.ndim != 2 for p in real):
                raise ValueError("NorMuon matrices of one group must share one 2-D shape and dtype")
            k = len(members) // world_size
            mine = [i for i in members[rank * k:(rank + 1) * k] if i is not None]
            if len({kinds[i] for i in mine}) > 1:
                raise ValueError("a rank's NorMuon chunk mixes attention and MLP matrices")
            attn = bool(mine) and kinds[mine[0]] == "attn"
            rows, cols = real[0].shape
            if attn and rows % 4:
                raise ValueError(f"attention qkvo must have 4*d rows, got {tuple(real[0].shape)}")
            n = len(mine)
            f32 = dict(dtype=torch.float32, device=device)
            self.groups.append(_MuonGroup(
                members=members, per_rank=k, mine=mine, attn=attn,
                momentum=torch.zeros(n, rows, cols, **f32),
                second_moment=torch.zeros((n, rows, 1) if rows >= cols else (n, 1, cols), **f32),
                mantissa=(torch.zeros(n, rows, cols, dtype=torch.uint16, device=device)
                          if real[0].dtype == torch.bfloat16 else None),
                lr_scale=torch.tensor([max(1.0, rows / cols) ** 0.5 * MUON_LR_MUL[self.labels[i]]
                                       for i in mine], **f32).view(n, 1, 1),
            ))

    def _stacked_grads(self, g: _MuonGroup) -> Tensor:
        first = self.params[g.members[0]]  # groups start with a real matrix; pads come last
        zero = None
        grads = []
        for i in g.members:
            grad = None if i is None else self.params[i].grad
            if grad is None:
                zero = torch.zeros_like(first) if zero is None else zero
                grad = zero
            grads.append(grad)
        return torch.stack(grads)

    def launch_reduce(self) -> list:
        """Stack every group's gradients and start their averaging reduce-scatters (async)."""
        pending = []
        for g in self.groups:
            stacked = self._stacked_grads(g)
            if self.world_size == 1:
                pending.append((None, stacked, stacked))
            else:
                chunk = stacked.new_empty(g.per_rank, *stacked.shape[1:])
                work = dist.reduce_scatter_tensor(chunk, stacked, op=dist.ReduceOp.AVG, async_op=True)
                pending.append((work, stacked, chunk))
        return pending

    def finish(self, pending: list, lr: float, momentum: float) -> None:
        """Update this rank's matrices from the averaged gradients, all-gather, drop grads."""
        gathers = []
        for g, (work, _, chunk) in zip(self.groups, pending):
            if work is not None:
                work.wait()
            mine = [self.params[i] for i in g.mine]
            new = self._update(g, chunk[:len(mine)], lr, momentum) if mine else None
            if self.world_size == 1:
                torch._foreach_copy_(mine, list(new.unbind(0)))
                continue
            ref = self.params[g.members[0]]
            send = ref.new_zeros(g.per_rank, *ref.shape)
            if mine:
                send[:len(mine)].copy_(new)
            out = ref.new_empty(len(g.members), *ref.shape)
            gathers.append((dist.all_gather_into_tensor(out, send, async_op=True), g, out, send))
        for work, g, out, _ in gathers:
            work.wait()
            slots = [j for j, i in enumerate(g.members) if i is not None]
            torch._foreach_copy_([self.params[g.members[j]] for j in slots], [out[j] for j in slots])
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float, momentum: float) -> None:
        self.finish(self.launch_reduce(), lr, momentum)

    def _update(self, g: _MuonGroup, grad: Tensor, lr: float, mu: float) -> Tensor:
        """New values (n, rows, cols), in the parameters' dtype, of this rank's matrices."""
        n, rows, cols = grad.shape
        u = grad.float()  # a fresh copy for bf16 grads; for fp32 the (private) chunk itself
        g.momentum.lerp_(u, 1 - mu)
        u.lerp_(g.momentum, mu)  # Nesterov: u = lerp(g, m, mu)
        o = orthogonalize_update(u.to(self.ortho_dtype), g.attn).float()
        # NorMuon: per-row (per-column if wider than tall) second moment, then keep ||o||_F
        v_mean = o.square().mean(dim=-1 if rows >= cols else -2, keepdim=True)
        g.second_moment.lerp_(v_mean, 1 - self.beta2)
        norm = torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True)
        o = o * g.second_moment.clamp_min(1e-10).rsqrt()
        o.mul_(norm / torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True).clamp_min(1e-10))
        # cautious weight decay on the exact fp32 master weight
        p = torch.stack([self.params[i] for i in g.mine])
        master = fp32_from_bf16_and_mantissa(p, g.mantissa) if g.mantissa is not None else p.float()
        lr_p = g.lr_scale * lr
        decay = (lr_p * (self.weight_decay * lr)) * master * ((o * master) >= 0)
        master -= lr_p * o + decay
        if g.mantissa is None:
            return master.to(p.dtype)
        split_fp32_to_bf16_and_mantissa(master, p, g.mantissa)
        return p

    def state_dict(self) -> dict:
        return {name: [None if getattr(g, name) is None else getattr(g, name).clone() for g in self.groups]
                for name in ("momentum", "second_moment", "mantissa")}

    def load_state_dict(self, state: dict) -> None:
        for name, tensors in state.items():
            for g, t in zip(self.groups, tensors, strict=True):
                if t is not None:
                    getattr(g, name).copy_(t)


@dataclass
class _AdamSlot:
    param: Tensor
    label: str
    betas: tuple
    lr_mul: float
    wd_mul: float
    sharded: bool  # state and update cover rows [rank*s, (rank+1)*s) only
    m: Tensor
    v: Tensor
    step: int = 0
    pending: tuple | None = None  # (work handle, averaged grad or grad shard)


class DistAdam:
    """Adam with bias correction and cautious decay (SPEC 3, Adam), per-label hyperparameters.

    With world_size > 1, gradients are averaged by collectives started in post-accumulate-grad
    hooks while `armed` (else at step time): tensors of < 1024 elements or whose dim 0 is not
    divisible by world_size are all-reduced and updated in full on every rank; larger ones are
    reduce-scattered along dim 0, updated shard-wise (sharded state) and all-gathered.
    """

    def __init__(self, params: list[Tensor], labels: list[str], eps: float, weight_decay: float,
                 rank: int = 0, world_size: int = 1):
        self.eps, self.weight_decay = eps, weight_decay
        self.rank, self.world_size = rank, world_size
        self.armed = False
        self.slots: list[_AdamSlot] = []
        self._launched: list[_AdamSlot] = []
        for p, label in zip(params, labels, strict=True):
            cfg = ADAM_LABELS[label]
            sharded = world_size > 1 and p.numel() >= ADAM_SHARD_MIN_NUMEL and p.size(0) % world_size == 0
            shape = (p.size(0) // world_size, *p.shape[1:]) if sharded else p.shape
            slot = _AdamSlot(p, label, cfg["betas"], cfg["lr_mul"], cfg["wd_mul"], sharded,
                             torch.zeros(shape, dtype=torch.float32, device=p.device),
                             torch.zeros(shape, dtype=torch.float32, device=p.device))
            self.slots.append(slot)
            if world_size > 1:
                p.register_post_accumulate_grad_hook(lambda _p, slot=slot: self._on_grad(slot))

    def _on_grad(self, slot: _AdamSlot) -> None:
        if self.armed:
            self._launch_sync(slot)

    def _launch_sync(self, slot: _AdamSlot) -> None:
        if slot.pending is not None:
            raise RuntimeError(f"Adam gradient of a '{slot.label}' parameter was synchronized twice "
                               "in one step: arm the sync only for the last micro-batch of an Adam step")
        grad = slot.param.grad
        if slot.sharded:
            shard = grad.new_empty(slot.m.shape)
            work = dist.reduce_scatter_tensor(shard, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
            slot.pending = (work, shard)
        else:
            slot.pending = (dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True), grad)
        self._launched.append(slot)

    def _local(self, slot: _AdamSlot) -> Tensor:
        p = slot.param.detach()
        return p.narrow(0, self.rank * slot.m.size(0), slot.m.size(0)) if slot.sharded else p

    def step(self, lr: float) -> list:
        """One Adam update of every parameter that has a gradient; returns the pending
        all-gather work handles (wait on them before the parameters are used)."""
        if self.world_size > 1:  # gradients whose sync was not started by an armed hook
            for slot in self.slots:
                if slot.pending is None and slot.param.grad is not None:
                    self._launch_sync(slot)
            ready = self._launched
        else:
            ready = [slot for slot in self.slots if slot.param.grad is not None]
        gathers = []
        for slot in ready:
            if slot.pending is not None:
                work, grad = slot.pending
                work.wait()
                slot.pending = None
            else:
                grad = slot.param.grad
            new = self._update(slot, grad, lr)
            if slot.sharded:
                gathers.append(dist.all_gather_into_tensor(slot.param.detach(), new, async_op=True))
            else:
                slot.param.copy_(new)
        self._launched = []
        for slot in self.slots:
            slot.param.grad = None
        return gathers

    def _update(self, slot: _AdamSlot, grad: Tensor, lr: float) -> Tensor:
        b1, b2 = slot.betas
        slot.step += 1
        g = grad.float()
        slot.m.lerp_(g, 1 - b1)
        slot.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        lr_p = lr * slot.lr_mul
        upd = slot.m / (slot.v.sqrt() + self.eps)
        upd *= lr_p * (1 - b2 ** slot.step) ** 0.5 / (1 - b1 ** slot.step)
        p = self._local(slot).float()
        if slot.wd_mul:
            upd += (lr_p * lr_p * self.weight_decay * slot.wd_mul) * p * ((upd * p) > 0)
        return (p - upd).to(slot.param.dtype)

    def slot(self, label: str) -> _AdamSlot:
        found = [s for s in self.slots if s.label == label]
        if len(found) != 1:
            raise ValueError(f"expected one Adam parameter labelled {label!r}, found {len(found)}")
        return found[0]

    def state_dict(self) -> dict:
        return {"m": [s.m.clone() for s in self.slots], "v": [s.v.clone() for s in self.slots],
                "step": [s.step for s in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        for s, m, v, step in zip(self.slots, state["m"], state["v"], state["step"], strict=True):
            s.m.copy_(m)
            s.v.copy_(v)
            s.step = step
            s.pending = None
        self._launched = []


class Optimizers:
    """NorMuon + Adam, as the training loop drives them.

    Per step: call arm_adam_sync(True) right before the backward of the last micro-batch of an
    Adam (odd) step and arm_adam_sync(False) before every other backward; then
    step(lr_multiplier, momentum, adam_step) with the micro-batches' gradients accumulated in
    p.grad (summed over micro-batches; NOT averaged over ranks: step() does that).
    """

    def __init__(self, model: nn.Module, args: Hyperparameters, rank: int, world_size: int,
                 *, muon_packed: bool | None = None):
        self.args, self.rank, self.world_size = args, rank, world_size
        muon, adam = ([], []), ([], [])
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            label = getattr(p, "label", None)
            if label in MUON_LR_MUL:
                dest = muon
            elif label in ADAM_LABELS:
                dest = adam
            else:
                raise ValueError(f"parameter {name!r} has label {label!r}; expected one of "
                                 f"{sorted(MUON_LR_MUL) + sorted(ADAM_LABELS)}")
            dest[0].append(p)
            dest[1].append(label)
        self.muon = NorMuon(*muon, weight_decay=args.muon_weight_decay, beta2=args.muon_beta2,
                            rank=rank, world_size=world_size, packed=muon_packed)
        self.adam = DistAdam(*adam, eps=args.adam_eps, weight_decay=args.adam_weight_decay,
                             rank=rank, world_size=world_size)

    def arm_adam_sync(self, flag: bool) -> None:
        """Let the Adam gradient hooks start their collectives during the next backward."""
        self.adam.armed = bool(flag) and self.world_size > 1

    @torch.no_grad()
    def step(self, lr_multiplier: float, momentum: float, adam_step: bool) -> None:
        """NorMuon every step, Adam only when adam_step; Muon's reduce-scatters are in flight
        while Adam updates. Muon grads are dropped every step, Adam grads after an Adam update."""
        pending = self.muon.launch_reduce()
        gathers = self.adam.step(self.args.adam_lr * lr_multiplier) if adam_step else []
        self.muon.finish(pending, self.args.muon_lr * lr_multiplier, momentum)
        for work in gathers:
            work.wait()
        self.adam.armed = False

    @torch.no_grad()
    def split_embed(self) -> None:
        """Untie: embed gets lm_head's weight and its Adam state (m, v, step; the local shard)."""
        src, dst = self.adam.slot("lm_head"), self.adam.slot("embed")
        dst.param.copy_(src.param)
        dst.m.copy_(src.m)
        dst.v.copy_(src.v)
        dst.step = src.step

    def state_dict(self) -> dict:
        """Copies of all optimizer state (gradients are not part of it)."""
        return {"muon": self.muon.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict() bit for bit; also drops all gradients (e.g. the Adam gradients an
        even step leaves for the next step), as a restored state has none pending."""
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])
        self.adam.armed = False
        for p in self.muon.params + [s.param for s in self.adam.slots]:
            p.grad = None


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
