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
        val_tokens=8192,
        val_batch_size=2048,
        train_max_seq_len=128,
        train_batch_sizes=(512, 1024, 1536),
        num_scheduled_iterations=120,
        num_extension_iterations=6,
        momentum_warmup_steps=20,
        momentum_cooldown_steps=4,
        val_loss_every=40,
        block_size=16,
        num_heads=6,
        head_dim=16,
        model_dim=96,
    ),
}

# =====================================================================================
# 2. Kernels
# =====================================================================================

# --- 2a. Symmetric matmuls for Polar Express (Triton on CUDA, PyTorch elsewhere) ------


# --- 2b. Attention backends (FlashAttention-3, FlexAttention, SDPA) ------------------
# Every backend computes the same thing on packed (varlen) sequences: q, k, v of shape
# (T, H, D) hold several documents back to back; cu_seqlens (int32) lists where each
# document starts (padded at the end with T). Query i sees key j iff both lie in the same
# document and i - window <= j <= i. The backend is chosen once at start-up
# (select_attention_backend) and stored on the model, so the hot path has no branches.

FA3_HUB_REPO = os.environ.get("TRAIN_GPT_FA3_REPO", "varunneal/flash-attention-3")


def document_ids(cu_seqlens: Tensor, T: int) -> Tensor:
    """Index of the document each of the T positions belongs to."""
    pos = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, pos, right=True) - 1


def attention_sdpa(q, k, v, cu_seqlens, max_seqlen, window, scale):
    """Reference backend: an explicit (T, T) boolean mask; O(T^2) memory, any device."""
    T = q.size(0)
    doc = document_ids(cu_seqlens, T)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    mask = (doc[:, None] == doc[None, :]) & (j <= i) & (j >= i - window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def attention_flex(q, k, v, cu_seqlens, max_seqlen, window, scale):
    """FlexAttention with a block mask built from the documents and the window (CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.size(0)
    doc = document_ids(cu_seqlens, T)

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki) & (qi - ki <= window)

    block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device)
    out = flex_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=block_mask, scale=scale,
    )
    return out[0].transpose(0, 1)


def _make_fa3_attention(fa3):
    def attention_fa3(q, k, v, cu_seqlens, max_seqlen, window, scale):
        out = fa3.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
            softmax_scale=scale, causal=True, window_size=(window, 0),
        )
        return out[0] if isinstance(out, tuple) else out

    return attention_fa3


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, window, scale):
    """PyTorch's built-in varlen FlashAttention-2 kernel (sm80+), no download needed."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                       scale=scale, window_size=(window, 0))


ATTENTION_BACKENDS = ("fa3", "varlen", "flex", "sdpa")


def _try_backend(name: str, device: torch.device):
    """Returns (function, None) if `name` can run on `device`, else (None, reason)."""
    cuda = device.type == "cuda"
    if name == "sdpa":
        return attention_sdpa, None
    if name == "flex":
        if not cuda:
            return None, "FlexAttention has no backward on CPU"
        return attention_flex, None
    if name == "varlen":
        if not cuda or torch.cuda.get_device_capability(device)[0] < 8:
            return None, "varlen_attn needs an sm80+ CUDA GPU"
        try:
            import inspect
            from torch.nn.attention.varlen import varlen_attn
            params = inspect.signature(varlen_attn).parameters
            if "scale" not in params or "window_size" not in params:
                return None, "this torch's varlen_attn lacks scale/window_size"
        except ImportError:
            return None, "torch.nn.attention.varlen is not in this torch"
        return attention_varlen, None
    if name == "fa3":
        if not cuda or torch.cuda.get_device_capability(device)[0] != 9:
            return None, "FlashAttention-3 needs a Hopper (sm90) GPU"
        try:
            from kernels import get_kernel
            fa3 = get_kernel(FA3_HUB_REPO).flash_attn_interface
        except Exception as e:  # no `kernels` package, no network, no matching build
            return None, f"cannot load {FA3_HUB_REPO} from the kernel hub ({type(e).__name__}: {e})"
        return _make_fa3_attention(fa3), None
    raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(ATTENTION_BACKENDS)}")


def select_attention_backend(requested: str, device) -> tuple[str, object, str]:
    """Picks the attention backend once: (name, function, message for the log).
    'auto' tries FA3, torch varlen, FlexAttention, then SDPA; a forced backend that
    cannot run is an error."""
    device = torch.device(device)
    if requested != "auto":
        fn, why = _try_backend(requested, device)
        if fn is None:
            raise RuntimeError(f"--attn_backend={requested} cannot run here: {why}")
        return requested, fn, f"attention backend: {requested} (forced)"
    skipped = []
    for name in ATTENTION_BACKENDS:
        fn, why = _try_backend(name, device)
        if fn is not None:
            note = f" (fallback; skipped {'; '.join(skipped)})" if skipped and device.type == "cuda" else ""
            return name, fn, f"attention backend: {name}{note}"
        skipped.append(f"{name}: {why}")
    raise AssertionError("sdpa is always available")


# --- 2c. FP8 lm_head ------------------------------------------------------------------
# Training-time lm_head matmul in FP8 (H100/H200, compute capability >= 8.9): x and w are
# scaled into e4m3, the gradient into e5m2; scaled matmuls accumulate in higher precision.
# The scales are fixed constants of the record (SPEC section 2).

FP8_X_SCALE = 100 / 448
FP8_W_SCALE = 1.6 / 448
FP8_GRAD_SCALE = 0.75 / 448


@torch.library.custom_op("train_gpt::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """out = x @ w.T in FP8; also returns the FP8 copies of x and w for the backward."""
    x_f8 = x.div(x_s).to(torch.float8_e4m3fn)
    w_f8 = w.div(w_s).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(
        x_f8, w_f8.T,
        scale_a=x.new_tensor(x_s, dtype=torch.float32), scale_b=x.new_tensor(w_s, dtype=torch.float32),
        out_dtype=torch.bfloat16, use_fast_accum=True,
    )
    return out, x_f8, w_f8


@fp8_mm.register_fake
def _(x, w, x_s, w_s, grad_s):
    return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16),
            torch.empty_like(x, dtype=torch.float8_e4m3fn), torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("train_gpt::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor]:
    one = g.new_tensor
    g_f8 = g.div(grad_s).to(torch.float8_e5m2)
    # grad_x = g @ w : (T, V) @ (V, d); the second operand must be column-major
    grad_x = torch._scaled_mm(
        g_f8, w_f8.T.contiguous().T,
        scale_a=one(grad_s, dtype=torch.float32), scale_b=one(w_s, dtype=torch.float32),
        out_dtype=torch.bfloat16, use_fast_accum=False,
    )
    # grad_w = g.T @ x, computed as (x.T @ g).T : (d, T) @ (T, V)
    grad_w = torch._scaled_mm(
        x_f8.T.contiguous(), g_f8.T.contiguous().T,
        scale_a=one(x_s, dtype=torch.float32), scale_b=one(grad_s, dtype=torch.float32),
        out_dtype=torch.float32, use_fast_accum=False,
    ).T
    return grad_x, grad_w


@fp8_mm_backward.register_fake
def _(g, x_f8, w_f8, x_s, w_s, grad_s):
    return torch.empty_like(x_f8, dtype=torch.bfloat16), torch.empty_like(w_f8, dtype=torch.float32)


def _fp8_mm_backward(ctx, grad_out, *_):
    x_f8, w_f8 = ctx.saved_tensors
    grad_x, grad_w = torch.ops.train_gpt.fp8_mm_backward(grad_out, x_f8, w_f8, *ctx.scales)
    return grad_x, grad_w, None, None, None


def _fp8_mm_setup_context(ctx, inputs, output):
    _, _, x_s, w_s, grad_s = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.scales = (x_s, w_s, grad_s)
    ctx.set_materialize_grads(False)


fp8_mm.register_autograd(_fp8_mm_backward, setup_context=_fp8_mm_setup_context)


def fp8_supported(device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"FP8 lm_head needs a CUDA GPU (device is {device.type}); using a float32 linear (CPU runs in float32)"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return False, f"FP8 lm_head needs compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}; using a bf16 linear"
    return True, "FP8 lm_head: on"


# =====================================================================================
# 3. Optimizers
# =====================================================================================

# =====================================================================================
# 4. Model
# =====================================================================================

PAIRED_LAYERS = (0, 2, 5, 9)  # paired-head attention
LONG_LAYERS = (3, 10)  # long sliding window + partial key offset; all others short
NO_ATTN_LAYER = 6
VE_LAYERS = {0: 1, 1: 2, 8: 0, 9: 1, 10: 2}  # layer -> value embedding table
SKIP_FROM, SKIP_TO, BACKOUT_LAYER = 3, 6, 7
GATE_DIM = 12  # gates read the first 12 channels
# layout of the packed `scalars` parameter
N_LAYERS_FOR_SCALARS = 11
SC_RESID, SC_SA = 0, 11  # resid_lambda[11], sa_lambda[11 x 2]
SC_SMEAR, SC_BACKOUT, SC_SKIP = 33, 34, 35
N_SCALARS = 36


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class YaRNRotary(nn.Module):
    """Half-truncated rotary embedding with YaRN frequency updates.

    The first head_dim/2 channels rotate in adjacent pairs (2j, 2j+1) with frequency
    f_j = (1/1024)^(j/(head_dim/4 - 1)); the other half does not rotate. Applying it is
    `x * cos_table + flip_pairs(x) * sin_table`, tables in bf16 for `max_positions`.
    """

    def __init__(self, head_dim: int, max_positions: int, block_size: int):
        super().__init__()
        self.head_dim, self.max_positions, self.block_size = head_dim, max_positions, block_size
        self.register_buffer("factor1", torch.empty(max_positions, head_dim, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("factor2", torch.empty(max_positions, head_dim, dtype=torch.bfloat16), persistent=False)
        self.reset()

    def reset(self):
        n = self.head_dim // 4
        self.freqs = (1 / 1024) ** (torch.arange(n, dtype=torch.float64) / (n - 1))
        self.attn_scale = 0.1
        self._build_tables()

    def _build_tables(self):
        if self.factor1.is_meta:
            return
        dev = self.factor1.device
        pos = torch.arange(self.max_positions, dtype=torch.float64, device=dev)
        theta = pos[:, None] * self.freqs.to(dev)[None, :]
        cos, sin = theta.cos(), theta.sin()
        half = self.head_dim // 2
        f1 = torch.cat([cos.repeat_interleave(2, dim=-1), cos.new_ones(self.max_positions, half)], dim=-1)
        f2 = torch.cat([torch.stack([sin, -sin], dim=-1).flatten(-2), sin.new_zeros(self.max_positions, half)], dim=-1)
        # copy in place: the buffers keep their identity, so a compiled graph stays valid
        self.factor1.copy_(f1)
        self.factor2.copy_(f2)

    def update_window(self, old: int, new: int):
        """YaRN: stretch the low frequencies when the long window grows old -> new blocks."""
        r = self.block_size * old * self.freqs / (2 * math.pi)
        s = old / new
        w = ((r - 1) / (32 - 1)).clamp(0, 1)
        self.freqs = self.freqs * (s + w * (1 - s))
        self.attn_scale *= 0.2 * math.log(new / old) + 1
        self._build_tables()

    def forward(self, x: Tensor) -> Tensor:
        """x: (T, heads, head_dim), rotated by position 0..T-1."""
        T = x.size(0)
        f1, f2 = self.factor1[:T, None, :], self.factor2[:T, None, :]
        x_flip = x.view(*x.shape[:-1], -1, 2).flip(-1).view(x.shape)
        return f1 * x + f2 * x_flip


class Attention(nn.Module):
    """Causal sliding-window attention over packed documents with QK-norm, rotary, value
    embedding, output gate; optionally partial key offset or paired heads."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, paired: bool, key_offset: bool):
        super().__init__()
        assert num_heads * head_dim == dim
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.paired, self.key_offset = paired, key_offset
        self.qkvo = nn.Parameter(torch.empty(4 * dim, dim, dtype=torch.bfloat16))
        self.qkvo.label = "attn"

    def reset_parameters(self):
        bound = math.sqrt(3) * self.dim ** -0.5
        with torch.no_grad():
            self.qkvo[: 3 * self.dim].uniform_(-bound, bound)
            self.qkvo[3 * self.dim:].zero_()

    def forward(self, x, ve, sa_lambdas, attn_gate, ve_gate, rotary, attn_fn, cu_seqlens, max_seqlen, window):
        T, H, D, d = x.size(0), self.num_heads, self.head_dim, self.dim
        q, k, v = F.linear(x, sa_lambdas[0] * self.qkvo[: 3 * d].type_as(x)).view(T, 3, H, D).unbind(1)
        q, k = norm(q), norm(k)
        gate_in = x[:, :GATE_DIM]
        if ve is not None:
            v = v + 2 * torch.sigmoid(F.linear(gate_in, ve_gate.type_as(x)))[..., None] * ve.view(T, H, D)
        if self.paired:
            # Heads h and h + H/2 form a pair: the (T, H, D) memory viewed as (2T, H/2, D)
            # puts the first members at position 2t and the second at 2t + 1 (no copy).
            # Rotary over the 2T positions staggers the pair; documents double in length.
            q, k, v = (t.reshape(2 * T, H // 2, D) for t in (q, k, v))
            q, k = rotary(q), rotary(k)
            y = attn_fn(q, k, v, 2 * cu_seqlens, 2 * max_seqlen, window, rotary.attn_scale)
            y = y.reshape(T, H, D)
        else:
            q, k = rotary(q), rotary(k)
            if self.key_offset:
                # partial key offset: the keys' channels [D/4, D/2) and [3D/4, D) come from
                # the previous position, so one layer can match "the token after X"
                k = torch.cat([k[:1], k[:-1]], dim=0).where(self._offset_mask(k), k)
            y = attn_fn(q, k, v, cu_seqlens, max_seqlen, window, rotary.attn_scale)
        y = y * torch.sigmoid(F.linear(gate_in, attn_gate.type_as(x)))[..., None]
        return F.linear(y.reshape(T, d), sa_lambdas[1] * self.qkvo[3 * d:].type_as(x))

    def _offset_mask(self, k: Tensor) -> Tensor:
        D = self.head_dim
        c = torch.arange(D, device=k.device)
        return ((c >= D // 4) & (c < D // 2)) | (c >= 3 * D // 4)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.c_fc = nn.Parameter(torch.empty(4 * dim, dim, dtype=torch.bfloat16))
        self.c_proj = nn.Parameter(torch.empty(4 * dim, dim, dtype=torch.bfloat16))
        self.c_fc.label, self.c_proj.label = "mlp_fc", "mlp_proj"

    def reset_parameters(self):
        bound = math.sqrt(3) * 0.5 * self.dim ** -0.5
        with torch.no_grad():
            self.c_fc.uniform_(-bound, bound)
            self.c_proj.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.linear(x, self.c_fc.type_as(x))).square() @ self.c_proj.type_as(x)


class Block(nn.Module):
    def __init__(self, layer: int, args: Hyperparameters):
        super().__init__()
        self.layer = layer
        self.attn = None if layer == NO_ATTN_LAYER else Attention(
            args.model_dim, args.num_heads, args.head_dim,
            paired=layer in PAIRED_LAYERS, key_offset=layer in LONG_LAYERS)
        self.mlp = MLP(args.model_dim)


class GPT(nn.Module):
    """The 11-layer speedrun GPT. forward() returns the summed multi-token-prediction loss
    in training mode and the mean cross-entropy in eval mode."""

    def __init__(self, args: Hyperparameters, max_positions: int):
        super().__init__()
        if args.num_layers != N_LAYERS_FOR_SCALARS:
            raise ValueError(f"num_layers={args.num_layers}: the layer-specific layout needs 11")
        if args.num_heads % 2 or args.model_dim != args.num_heads * args.head_dim:
            raise ValueError(f"need an even num_heads and model_dim == num_heads * head_dim, got "
                             f"{args.num_heads} x {args.head_dim} vs {args.model_dim}")
        self.args = args
        V, d, H = next_multiple_of_n(args.vocab_size, 128), args.model_dim, args.num_heads
        self.padded_vocab = V
        bf16 = torch.bfloat16
        self.lm_head = nn.Parameter(torch.empty(V, d, dtype=bf16))
        self.embed = nn.Parameter(torch.empty(V, d, dtype=bf16))  # used from the split on
        self.value_embeds = nn.ParameterList([nn.Parameter(torch.empty(V, d, dtype=bf16)) for _ in range(3)])
        self.blocks = nn.ModuleList([Block(i, args) for i in range(args.num_layers)])
        n_attn = args.num_layers - 1
        self.attn_gate_bank = nn.Parameter(torch.empty(n_attn, H, GATE_DIM, dtype=bf16))
        self.ve_gate_bank = nn.Parameter(torch.empty(len(VE_LAYERS), H, GATE_DIM, dtype=bf16))
        self.smear_gate = nn.Parameter(torch.empty(1, GATE_DIM, dtype=bf16))
        self.skip_gate = nn.Parameter(torch.empty(1, GATE_DIM, dtype=bf16))
        self.scalars = nn.Parameter(torch.empty(N_SCALARS, dtype=torch.float32))
        self.x0_lambda = nn.Parameter(torch.empty(args.num_layers, dtype=torch.float32))
        for name in ("lm_head", "embed", "attn_gate_bank", "ve_gate_bank", "smear_gate", "skip_gate",
                     "scalars", "x0_lambda"):
            getattr(self, name).label = name
        for p in self.value_embeds:
            p.label = "value_embed"
        self.rotary = YaRNRotary(args.head_dim, max_positions, args.block_size)
        self.attn_fn = attention_sdpa  # replaced by build_model's backend choice
        self.use_fp8 = False
        self.act_dtype = torch.bfloat16  # build_model uses float32 on CPU
        self.split_done = False  # embed split off from lm_head yet?
        self.windows = (1, 3)  # (short, long) in blocks, set by the schedule
        # index of each layer's gate in the banks
        self.attn_gate_index = {i: j for j, i in enumerate(i for i in range(args.num_layers) if i != NO_ATTN_LAYER)}
        self.ve_gate_index = {i: j for j, i in enumerate(sorted(VE_LAYERS))}

    @torch.no_grad()
    def reset_parameters(self):
        self.lm_head.normal_(0.0, 0.005)
        self.embed.zero_()
        for p in (*self.value_embeds, self.attn_gate_bank, self.ve_gate_bank, self.smear_gate, self.skip_gate,
                  self.x0_lambda):
            p.zero_()
        for block in self.blocks:
            block.mlp.reset_parameters()
            if block.attn is not None:
                block.attn.reset_parameters()
        sc = self.scalars
        sc[SC_RESID:SC_RESID + 11] = 1.1
        sc[SC_SA:SC_SA + 22] = torch.tensor([0.5, 1.0]).repeat(11)
        sc[SC_SMEAR], sc[SC_BACKOUT], sc[SC_SKIP] = 0.0, 0.5, -1.5
        self.split_done = False
        self.rotary.reset()

    @torch.no_grad()
    def split_embed(self):
        """From here on the input embedding is its own table, starting as lm_head's copy."""
        self.embed.copy_(self.lm_head)
        self.split_done = True

    def set_windows(self, short: int, long: int, yarn: bool = True):
        """Sets the (short, long) windows in blocks; a change of the long window updates
        YaRN unless yarn=False (the final validation's longer window)."""
        if yarn and long != self.windows[1]:
            self.rotary.update_window(self.windows[1], long)
        self.windows = (short, long)

    def forward(self, input_seq: Tensor, target_seq: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                mtp_weights: Tensor | None = None) -> Tensor:
        sc = self.scalars
        resid_lambda = sc[SC_RESID:SC_RESID + 11]
        sa_lambda = sc[SC_SA:SC_SA + 22].view(11, 2)
        bs = self.args.block_size
        short_w, long_w = self.windows[0] * bs, self.windows[1] * bs

        # activations in bf16 on GPU; in fp32 on CPU, where bf16 matmuls are ~10x slower
        # (.to / .type_as are no-ops when the dtype already matches)
        act = self.act_dtype
        x = F.embedding(input_seq, self.embed if self.split_done else self.lm_head).to(act)
        ves = [F.embedding(input_seq, table).to(act) for table in self.value_embeds]
        # smear: mix a gated fraction of the previous token's embedding into each token
        gate = sc[SC_SMEAR] * torch.sigmoid(F.linear(x[1:, :GATE_DIM], self.smear_gate.type_as(x)))
        x = torch.cat([x[:1], x[1:] + gate * x[:-1]])
        x = x0 = norm(x)

        skip = backout = None
        for i, block in enumerate(self.blocks):
            if i == SKIP_TO:
                g = torch.sigmoid(sc[SC_SKIP]) * 2 * torch.sigmoid(F.linear(x0[:, :GATE_DIM], self.skip_gate.type_as(x)))
                x = x + g * skip
            if i == 0:
                x = (resid_lambda[0] + self.x0_lambda[0]) * x
            else:
                x = resid_lambda[i] * x + self.x0_lambda[i] * x0
            if block.attn is not None:
                ve = ves[VE_LAYERS[i]] if i in VE_LAYERS else None
                ve_gate = self.ve_gate_bank[self.ve_gate_index[i]] if i in VE_LAYERS else None
                x = x + block.attn(
                    norm(x), ve, sa_lambda[i], self.attn_gate_bank[self.attn_gate_index[i]], ve_gate,
                    self.rotary, self.attn_fn, cu_seqlens, max_seqlen,
                    long_w if i in LONG_LAYERS else short_w)
            x = x + block.mlp(norm(x))
            if i == SKIP_FROM:
                skip = x
            if i == BACKOUT_LAYER:
                backout = x
        x = norm(x - sc[SC_BACKOUT] * backout)

        if self.training:
            if self.use_fp8:
                logits = fp8_mm(x, self.lm_head, FP8_X_SCALE, FP8_W_SCALE, FP8_GRAD_SCALE)[0]
            else:
                logits = F.linear(x, self.lm_head.type_as(x))
            return mtp_loss(softcap(logits.float()), target_seq, mtp_weights)
        # eval: mean cross-entropy, the head applied in chunks to bound the logits' memory
        total = x.new_zeros((), dtype=torch.float32)
        W = self.lm_head.type_as(x)
        for s in range(0, x.size(0), EVAL_HEAD_CHUNK):
            logits = softcap(F.linear(x[s:s + EVAL_HEAD_CHUNK], W).float())
            total = total + F.cross_entropy(logits, target_seq[s:s + EVAL_HEAD_CHUNK], reduction="sum")
        return total / x.size(0)


EVAL_HEAD_CHUNK = 32768


def softcap(logits: Tensor) -> Tensor:
    return 23 * torch.sigmoid((logits + 5) / 7.5)


def mtp_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """sum_t sum_k w[k] * CE(logits_t, target_{t+k}); positions past the end add nothing."""
    T = logits.size(0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = logits.new_zeros(())
    for k in range(weights.size(0)):
        picked = logits[: T - k].gather(1, targets[k:, None]).squeeze(1)
        loss = loss + weights[k] * (lse[: T - k] - picked).sum()
    return loss


def rotary_positions(args: Hyperparameters) -> int:
    """Rotary table length: 2x (paired heads) the longest packed sequence of a rank."""
    longest = max(max(args.train_batch_sizes), args.val_batch_size) // VIRTUAL_RANKS
    return 2 * longest


def build_model(args: Hyperparameters, device, attn_backend: str | None = None, fp8: str | None = None,
                log=None) -> GPT:
    """Builds and initializes the model on `device` (meta too: no allocation, no init).
    Chooses the attention backend and the FP8 head once; `log` receives one line each."""
    device = torch.device(device)
    with torch.device(device):
        model = GPT(args, rotary_positions(args))
    if device.type != "meta":
        model.reset_parameters()
    log = log or (lambda msg: None)
    name, fn, msg = select_attention_backend(attn_backend or args.attn_backend, device) \
        if device.type != "meta" else ("sdpa", attention_sdpa, "")
    model.attn_fn, model.attn_backend = fn, name
    model.act_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if msg:
        log(msg)
    want = fp8 or args.fp8
    if want != "off" and device.type != "meta":
        ok, msg = fp8_supported(device)
        if not ok and want == "on":
            raise RuntimeError(f"--fp8=on: {msg}")
        model.use_fp8 = ok
        log(msg)
    return model


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
# Pure functions of (step, hyperparameters). S = num_scheduled_iterations; the extension
# steps S .. S+E-1 come after. Stage k in {0, 1, 2} is the k-th third of S, stage 3 the
# extension; batch size, windows and the lr step change at the same step (int(3*step/S)).


def total_steps(args: Hyperparameters) -> int:
    return args.num_scheduled_iterations + args.num_extension_iterations


def stage(step: int, args: Hyperparameters) -> int:
    S = args.num_scheduled_iterations
    return 3 if step >= S else (3 * step) // S  # integer form of int(3 * step / S)


def batch_size_at(step: int, args: Hyperparameters) -> int:
    return args.train_batch_sizes[min(stage(step, args), 2)]


def windows_at(step: int, args: Hyperparameters) -> tuple[int, int]:
    """(short, long) attention windows in blocks."""
    k = stage(step, args)
    if k == 3:
        return tuple(args.extension_windows)
    long = args.long_windows[k]
    return long // 2, long


def final_windows(args: Hyperparameters) -> tuple[int, int]:
    """Windows of the last validation: the extension's short window, a longer long one."""
    return args.extension_windows[0], args.final_long_window


def lr_multiplier(step: int, args: Hyperparameters) -> float:
    S = args.num_scheduled_iterations
    if step >= S:
        return args.lr_final
    x = step / S
    lr_max = args.lr_multipliers[0] if 3 * step <= S else args.lr_multipliers[1] if 3 * step <= 2 * S \
        else args.lr_multipliers[2]
    if x < 1 - args.cooldown_frac:
        return lr_max
    w = (1 - x) / args.cooldown_frac
    return lr_max * w + args.lr_final * (1 - w)


def muon_momentum(step: int, args: Hyperparameters) -> float:
    lo, hi = args.momentum_min, args.momentum_max
    N = total_steps(args)
    cooldown_start = N - args.momentum_cooldown_steps
    if step >= cooldown_start:
        return hi - (hi - lo) * min((step - cooldown_start) / args.momentum_cooldown_steps, 1.0)
    return lo + (hi - lo) * min(step / args.momentum_warmup_steps, 1.0)


def mtp_weights(step: int, args: Hyperparameters) -> list[float]:
    """Multi-token prediction: weights of the losses on the next 1, 2, 3 tokens."""
    x = step / args.num_scheduled_iterations
    k = stage(step, args)
    if k == 0:
        return [1.0, 0.5, 0.25 * (1 - 3 * x)]
    if k == 1:
        return [1.0, 0.5 * (1 - (3 * x - 1))]
    return [1.0]


def split_step(args: Hyperparameters) -> int:
    """Step after whose update embed splits from lm_head (odd: an Adam step)."""
    return math.ceil(args.split_embed_frac * args.num_scheduled_iterations) | 1


def warmup_steps(args: Hyperparameters) -> list[int]:
    """Steps run before the clock starts so every compiled shape exists: 0, 1, 2 and each
    stage transition +-1 (the split step is one of them)."""
    N = total_steps(args)
    transitions = sorted({s for s in range(1, N) if stage(s, args) != stage(s - 1, args)})
    steps = {0, 1, 2} | {s + d for s in transitions for d in (-1, 0, 1)}
    return sorted(s for s in steps if 0 <= s < N)


# =====================================================================================
# 7. Training loop
# =====================================================================================


class ConfigError(Exception):
    """Bad input the user can fix: printed as one line, no traceback."""


class Logger:
    """Prints on rank 0 and appends to logs/<run_id>.txt (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, msg: str = "", console: bool = True):
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def environment_report() -> str:
    """Versions and nvidia-smi, so that a log says where it ran."""
    import platform
    import subprocess
    lines = [f"Python {sys.version.split()[0]} ({platform.platform()})", f"PyTorch {torch.__version__}"]
    try:
        import triton
        lines.append(f"Triton {triton.__version__}")
    except ImportError:
        lines.append("Triton: not installed")
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        lines.append(out.stdout.strip() or out.stderr.strip())
    except (OSError, subprocess.TimeoutExpired):
        lines.append("nvidia-smi: not available")
    return "\n".join(lines)


def check_config(args: Hyperparameters, world_size: int):
    if world_size < 1 or VIRTUAL_RANKS % world_size:
        raise ConfigError(f"WORLD_SIZE={world_size} does not divide {VIRTUAL_RANKS}: use 1, 2, 4 or 8 processes "
                          f"(gradient accumulation 8/world_size keeps the global batch)")
    for name in ("train_batch_sizes", "val_batch_size"):
        for bs in (getattr(args, name) if name == "train_batch_sizes" else (args.val_batch_size,)):
            if bs % VIRTUAL_RANKS:
                raise ConfigError(f"--{name}: batch {bs} is not divisible by the {VIRTUAL_RANKS} ranks of the "
                                  f"global batch ({world_size} processes x {VIRTUAL_RANKS // world_size} micro-batches)")
    if len(args.train_batch_sizes) != 3 or len(args.long_windows) != 3 or len(args.extension_windows) != 2:
        raise ConfigError("--train_batch_sizes and --long_windows take 3 values, --extension_windows 2")
    if args.val_tokens % args.val_batch_size:
        raise ConfigError(f"--val_tokens={args.val_tokens} is not divisible by --val_batch_size={args.val_batch_size}")
    if args.num_scheduled_iterations < 3:
        raise ConfigError("--num_scheduled_iterations must be at least 3 (one step per third)")


class Trainer:
    """Holds the model, its compiled form, the optimizers and the data streams of one run."""

    def __init__(self, args: Hyperparameters, rank: int, world_size: int, device: torch.device, log: Logger):
        self.args, self.rank, self.world_size, self.device, self.log = args, rank, world_size, device, log
        self.grad_accum = VIRTUAL_RANKS // world_size
        torch.manual_seed(args.seed)
        self.model = build_model(args, device, log=log)
        if world_size > 1:  # every rank starts from rank 0's initialization
            for p in self.model.parameters():
                dist.broadcast(p.detach(), 0)
        use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        if use_compile:
            torch._dynamo.config.cache_size_limit = 64
            self.forward = torch.compile(self.model, dynamic=False, fullgraph=True)
        else:
            self.forward = self.model
        log(f"torch.compile: {'on' if use_compile else 'off'}")
        self.opt = Optimizers(self.model, args, rank, world_size)
        self.split = split_step(args)
        self.train_loader = None
        self.batch_size = None

    # --- data ---
    def restart_data(self):
        self.batch_size = batch_size_at(0, self.args)
        self.train_loader = train_data_generator(self.args.train_files, self.batch_size, self.rank, self.world_size,
                                                 self.args.train_max_seq_len, device=self.device)
        self._fresh_loader = True

    def next_batches(self, batch_size: int):
        if self._fresh_loader:
            self._fresh_loader = False
            if batch_size == self.batch_size:
                return next(self.train_loader)
            next(self.train_loader)  # never used; only primes the generator for .send()
        if batch_size != self.batch_size:
            self.batch_size = batch_size
            return self.train_loader.send(batch_size)
        return next(self.train_loader)

    # --- one optimization step ---
    def train_step(self, step: int) -> Tensor:
        args = self.args
        self.model.set_windows(*windows_at(step, args))
        weights = torch.tensor(mtp_weights(step, args), device=self.device)
        adam_step = step % 2 == 1
        batches = self.next_batches(batch_size_at(step, args))
        total = torch.zeros((), device=self.device)
        for j, (inputs, targets, cu_seqlens) in enumerate(batches):
            self.opt.arm_adam_sync(adam_step and j == len(batches) - 1)
            loss = self.forward(inputs, targets, cu_seqlens, args.train_max_seq_len, weights)
            (loss / self.grad_accum).backward()
            total += loss.detach()
        self.opt.step(lr_multiplier(step, args), muon_momentum(step, args), adam_step)
        if step == self.split:
            self.model.split_embed()
            self.opt.split_embed()
        # summed multi-token loss per token, averaged over this rank's micro-batches
        return total / (len(batches) * batches[0][0].numel())

    @torch.no_grad()
    def validate(self, max_steps: int | None = None) -> float:
        args = self.args
        self.model.eval()
        loader = val_data_generator(args.val_files, args.val_batch_size, self.rank, self.world_size,
                                    device=self.device)
        n = args.val_tokens // args.val_batch_size
        n = min(n, max_steps) if max_steps else n
        total = torch.zeros((), device=self.device)
        count = 0
        for _ in range(n):
            for inputs, targets, cu_seqlens in next(loader):
                total += self.forward(inputs, targets, cu_seqlens, inputs.numel())
                count += 1
        total /= count
        if self.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        self.model.train()
        return total.item()

    # --- warm-up and exact reset ---
    def snapshot(self):
        return ({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                _clone_tree(self.opt.state_dict()))

    def restore(self, snap):
        model_state, opt_state = snap
        self.model.load_state_dict(model_state)
        self.model.split_done = False
        self.model.windows = windows_at(0, self.args)
        self.model.rotary.reset()
        self.opt.load_state_dict(_clone_tree(opt_state))
        for p in self.model.parameters():
            p.grad = None

    def warmup(self):
        """Runs every shape the timed run will see (steps 0, 1, 2 and each transition +-1,
        validation with each window), then restores the initial state exactly."""
        args = self.args
        t0 = time.perf_counter()
        snap = self.snapshot()
        self.restart_data()
        seen_windows = set()
        for step in warmup_steps(args):
            loss = self.train_step(step)
            if self.model.windows not in seen_windows:
                seen_windows.add(self.model.windows)
                self.validate(max_steps=1)
        self.model.set_windows(*final_windows(args), yarn=False)
        self.validate(max_steps=1)
        loss.item()
        self.restore(snap)
        self.log(f"warm-up ({len(warmup_steps(args))} steps + validation) took {time.perf_counter() - t0:.1f}s; "
                 f"state reset")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self):
        args, log = self.args, self.log
        N = total_steps(args)
        print_every = 1 if self.device.type == "cpu" else 25
        self.restart_data()
        self.model.set_windows(*windows_at(0, args))
        train_ms = 0.0
        self.sync()
        t0 = time.perf_counter()
        for step in range(N + 1):
            last = step == N
            if last or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
                self.sync()
                train_ms += 1000 * (time.perf_counter() - t0)
                if last:
                    self.model.set_windows(*final_windows(args), yarn=False)
                val_loss = self.validate()
                if not math.isfinite(val_loss):
                    raise ConfigError(f"validation loss is {val_loss} at step {step}: training diverged")
                log(f"step:{step}/{N} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms "
                    f"step_avg:{train_ms / max(step, 1):.2f}ms")
                self.sync()
                t0 = time.perf_counter()
            if last:
                break
            loss = self.train_step(step)
            done = step + 1
            if done % print_every == 0 or done == N:
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise ConfigError(f"training loss is {loss_value} at step {step}: training diverged")
                elapsed = train_ms + 1000 * (time.perf_counter() - t0)
                avg = elapsed / done
                log(f"step:{done}/{N} loss:{loss_value:.4f} train_time:{elapsed:.0f}ms step_avg:{avg:.2f}ms "
                    f"eta:{avg * (N - done) / 1000:.0f}s")
        return val_loss


def _clone_tree(obj):
    """Deep copy of a state dict: tensors cloned, containers rebuilt."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tree(v) for v in obj)
    return obj


# =====================================================================================
# 8. main
# =====================================================================================


def parse_args(argv=None) -> Hyperparameters:
    """Every Hyperparameters field is a flag (--name=value); --preset picks the base values."""
    parser = argparse.ArgumentParser(
        description="Train the speedrun GPT. Defaults are the 8x H100 record; --preset tiny is the CPU demo. "
                    "Every field of Hyperparameters is a flag: --name=value (tuples as A,B,C).")
    defaults = Hyperparameters()
    for f in dataclasses.fields(Hyperparameters):
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(f"--{f.name}", type=_parse_bool, default=None, metavar="BOOL",
                                help=f"(default {value})")
        elif isinstance(value, tuple):
            kind = type(value[0])
            parser.add_argument(f"--{f.name}", type=lambda s, k=kind: tuple(k(v) for v in s.split(",")),
                                default=None, metavar="A,B,..", help=f"(default {','.join(map(str, value))})")
        else:
            choices = list(PRESETS) if f.name == "preset" else None
            parser.add_argument(f"--{f.name}", type=type(value), default=None, choices=choices,
                                help=f"(default {value})")
    ns = parser.parse_args(argv)
    preset = ns.preset or defaults.preset
    args = dataclasses.replace(defaults, **PRESETS[preset], preset=preset)
    overrides = {k: v for k, v in vars(ns).items() if v is not None and k != "preset"}
    return dataclasses.replace(args, **overrides)


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        check_config(args, world_size)
        if args.device == "auto":
            device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        else:
            device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        list_shards(args.train_files), list_shards(args.val_files)  # fail early on missing data
        if world_size > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        import uuid
        run_id = args.run_id or str(uuid.uuid4())
        log = Logger(Path(args.log_dir) / f"{run_id}.txt" if rank == 0 else None)
        log(Path(__file__).read_text(), console=False)
        log("=" * 100, console=False)
        log(environment_report(), console=False)
        log("=" * 100, console=False)
        log(f"run {run_id}: {world_size} process(es) x {VIRTUAL_RANKS // world_size} micro-batches on {device}; "
            f"log file {log.path}")
        log("config: " + " ".join(f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                  for k, v in dataclasses.asdict(args).items()), console=False)
        trainer = Trainer(args, rank, world_size, device, log)
        warm = args.warmup and trainer.forward is not trainer.model
        if warm:
            trainer.warmup()
        trainer.run()
        if device.type == "cuda":
            log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        else:
            import resource
            log(f"peak memory (CPU resident set): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
