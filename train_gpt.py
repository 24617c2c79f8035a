"""Speedrun GPT trainer: the 11-layer "paired head attention" NanoGPT speedrun model in one file.

Sections, one concern each, in the order data flows: 1 config and flags, 2 kernels,
3 optimizers, 4 schedules, 5 model, 6 data, 7 checks (flags, inputs, resume), 8 files (log,
model file, checkpoint), 9 training (steps, warm-up, the timed loop), 10 main(). What it
computes is described in ALGORITHM.md, whose section numbers the comments cite.
Importing this module has no side effects; run it with `python train_gpt.py` (one process)
or `torchrun --nproc_per_node=N train_gpt.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import heapq
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# =====================================================================================
# 1. Config and flags
# =====================================================================================

# Every hyperparameter is one Hyperparameters field, declared with flag(): its default,
# its line of --help, the values it allows and whether a resumed run may change it.
# parse_args (--help, checks), check_resume and the log's config line all read that.

VIRTUAL_RANKS = 8  # every run does the math of 8 ranks: world_size * grad_accum == 8
REPO_DIR = Path(__file__).resolve().parent  # default data paths are relative to it


class ConfigError(Exception):
    """Bad input the user can fix: printed as one line (exit code 2), no traceback."""


def next_multiple_of_n(v: int, n: int) -> int:
    return ((v + n - 1) // n) * n


# Allowed values of a flag: (text for --help and errors, predicate on one value).
def _choices(*values):
    return f"one of {', '.join(map(str, values))}", lambda v: v in values


def _at_least(lo, hi=None):
    text = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    return text, lambda v: v == v and v >= lo and (hi is None or v <= hi)  # v == v: not NaN


def _in_open_closed(lo, hi):
    return f"in ({lo}, {hi}]", lambda v: lo < v <= hi


def _positive():
    return "> 0", lambda v: v == v and 0 < v < math.inf


_ANY = ("any", lambda v: True)
_BOOL = ("one of true, false", lambda v: isinstance(v, bool))
_SWITCH = _choices("auto", "on", "off")
ATTENTION_BACKENDS = ("fa3", "varlen", "flex", "sdpa")  # in the order auto tries them
GRAD_SUM_DTYPES = ("auto", "param", "float32", "float64")


def flag(default, help: str, allowed=_ANY, run_only: bool = False):
    """A Hyperparameters field that is also the flag --name=value. `allowed` is checked on
    every value (each one of a tuple); `run_only`: a resumed run may change it, as it says
    where things go or how they are computed, not what is computed."""
    return dataclasses.field(default=default, metadata=dict(help=help, allowed=allowed, run_only=run_only))


# base values by --preset (the record's are the field defaults); other flags override them
PRESETS = {
    "record": {},
    # CPU demo: all 11 layers and every layer-specific feature, on the offline sample corpus
    "tiny": dict(
        train_files="data/sample/sample_train_*.bin",
        val_files="data/sample/sample_val_*.bin",
        val_tokens=4096,
        val_batch_size=2048,
        train_max_seq_len=128,
        train_batch_sizes=(512, 768, 1024),
        num_scheduled_iterations=60,
        num_extension_iterations=4,
        momentum_warmup_steps=10,
        momentum_cooldown_steps=2,
        val_loss_every=20,
        block_size=16,
        num_heads=6,
        head_dim=16,
        model_dim=96,
    ),
}


@dataclass
class Hyperparameters:
    # --- data ---
    train_files: str = flag("data/fineweb10B/fineweb_train_*.bin",
                            "glob of the training shards (default paths are relative to the repository)",
                            run_only=True)
    val_files: str = flag("data/fineweb10B/fineweb_val_*.bin", "glob of the validation shards", run_only=True)
    val_tokens: int = flag(10_485_760, "validation tokens per evaluation, a multiple of --val_batch_size",
                           _positive())
    val_batch_size: int = flag(4 * 64 * 1024 * 8, "global tokens per validation step, a multiple of 8",
                               _positive())
    train_max_seq_len: int = flag(2048, "longest training sequence; longer documents are cut", _positive())
    train_batch_sizes: tuple = flag((8 * 2048 * 8, 16 * 2048 * 8, 24 * 2048 * 8),
                                    "global tokens per step in each third of the schedule (the last also in "
                                    "the extension), multiples of 8", _positive())
    # --- schedule (ALGORITHM.md section 4) ---
    num_scheduled_iterations: int = flag(1735, "scheduled steps S (batch, window and lr stages are its thirds)",
                                         _at_least(3))
    num_extension_iterations: int = flag(40, "steps after S at the final lr and the extension windows",
                                         _at_least(0))
    cooldown_frac: float = flag(0.5, "fraction of S at the end over which the lr decays", _in_open_closed(0, 1))
    split_embed_frac: float = flag(2 / 3, "fraction of S after which embed is untied from lm_head",
                                   _in_open_closed(0, 1))
    lr_multipliers: tuple = flag((1.0, 1.52, 1.73), "lr multiplier of each third of the schedule", _at_least(0))
    lr_final: float = flag(0.1, "lr multiplier at the end of the cooldown and in the extension", _at_least(0))
    momentum_min: float = flag(0.85, "Muon momentum at the start and at the very end", _at_least(0, 1))
    momentum_max: float = flag(0.95, "Muon momentum after the warm-up", _at_least(0, 1))
    momentum_warmup_steps: int = flag(300, "steps of the Muon momentum warm-up", _positive())
    momentum_cooldown_steps: int = flag(50, "last steps over which the Muon momentum falls back", _positive())
    val_loss_every: int = flag(250, "validate every N steps (0: only at the end)", _at_least(0), run_only=True)
    # --- attention windows, in blocks of block_size tokens ---
    block_size: int = flag(128, "tokens per attention-window block", _positive())
    long_windows: tuple = flag((3, 7, 11), "long window (blocks) of each third; short = long // 2", _positive())
    extension_windows: tuple = flag((6, 13), "(short, long) windows in blocks during the extension", _positive())
    final_long_window: int = flag(20, "long window (blocks) of the final validation (short stays)", _positive())
    # --- model ---
    # above BOS (50256) so that BOS is a token; at most 65536 (uint16 shards)
    vocab_size: int = flag(50257, "vocabulary size; token ids must be below it", _in_open_closed(50256, 65536))
    num_layers: int = flag(11, "transformer layers (the layer table LAYERS needs 11)", _choices(11))
    num_heads: int = flag(6, "attention heads (even: paired heads)", _positive())
    head_dim: int = flag(128, "channels per head, a multiple of 4", _positive())
    model_dim: int = flag(768, "model width = num_heads * head_dim", _positive())
    # --- optimizers (ALGORITHM.md section 3) ---
    muon_lr: float = flag(0.023, "NorMuon learning rate", _at_least(0))
    muon_weight_decay: float = flag(1.2, "NorMuon cautious weight decay", _at_least(0))
    muon_beta2: float = flag(0.95, "NorMuon second-moment decay", _at_least(0, 1))
    adam_lr: float = flag(0.008, "Adam learning rate", _at_least(0))
    adam_eps: float = flag(1e-10, "Adam epsilon", _positive())
    adam_weight_decay: float = flag(0.005, "Adam cautious weight decay", _at_least(0))
    # --- run: where things go and which kernels compute them ---
    seed: int = flag(0, "random seed of the initialization", _at_least(0))
    run_id: str = flag("", "log file name logs/<run_id>.txt (default: a new UUID); never overwritten",
                       run_only=True)
    log_dir: str = flag("logs", "folder of the log files", run_only=True)
    device: str = flag("auto", "where to train", _choices("auto", "cuda", "cpu"), run_only=True)
    attn_backend: str = flag(os.environ.get("TRAIN_GPT_ATTN", "auto"),
                             "attention kernel (env TRAIN_GPT_ATTN); auto: the first that works",
                             _choices("auto", *ATTENTION_BACKENDS), run_only=True)
    fp8: str = flag("auto", "FP8 lm_head; auto: on when the GPU supports it", _SWITCH, run_only=True)
    compile: str = flag("auto", "torch.compile(fullgraph=True); auto: on for CUDA", _SWITCH, run_only=True)
    fused_loss: str = flag("auto", "the FP8 loss head fused (on: in one pass over the logits); auto: on CUDA, "
                           "the fastest of one pass, two passes and the unfused head, timed at start-up",
                           _SWITCH, run_only=True)
    fused_mlp: str = flag("auto", "the MLP's first matmul with relu^2 in its epilogue (and its derivative in "
                          "the backward's); auto: on CUDA, timed against the unfused MLP at start-up",
                          _SWITCH, run_only=True)
    # auto: float64 on CPU, bitwise the same for 1-8 processes; on GPU float32 with gradient
    # accumulation, else the parameters' own dtype as in the record
    grad_sum_dtype: str = flag("auto", "dtype of the gradient sums over micro-batches (see README)",
                               _choices(*GRAD_SUM_DTYPES))
    warmup: bool = flag(True, "when compiling: compile every shape first, then reset the state", _BOOL,
                        run_only=True)
    save_model: str = flag("", "path: rank 0 saves the final model there (reload with load_model)",
                           run_only=True)
    checkpoint_every: int = flag(0, "write logs/<run_id>.stepNNNNNN.pt every N steps, at the end and on "
                                 "Ctrl-C / SIGTERM (0: never); the last 2 are kept", _at_least(0), run_only=True)
    resume: str = flag("", "continue from this checkpoint (same configuration and number of processes)",
                       run_only=True)
    preset: str = flag("record", "base values: record (8x H100) or tiny (CPU demo); other flags override them",
                       _choices(*PRESETS), run_only=True)


# name -> dict(help, allowed, run_only), read from the fields
FLAGS = {f.name: f.metadata for f in dataclasses.fields(Hyperparameters)}
RUN_ONLY_FLAGS = frozenset(name for name, meta in FLAGS.items() if meta["run_only"])


class _FlagParser(argparse.ArgumentParser):
    """argparse with whole flag names only (--num_scheduled_iteration is not
    --num_scheduled_iterations) and one-line errors that suggest the nearest flag."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, no usage block
        if message.startswith("unrecognized arguments: "):
            import difflib
            unknown = message.removeprefix("unrecognized arguments: ").split()
            parts = []
            for arg in unknown:
                name = arg.split("=", 1)[0].lstrip("-")
                near = difflib.get_close_matches(name, FLAGS, n=1, cutoff=0.75) if arg.startswith("--") else []
                parts.append(f"{arg} (did you mean --{near[0]}?)" if near else arg)
            message = f"unknown flag(s): {', '.join(parts)}; python train_gpt.py --help lists them"
        raise ConfigError(message)


def _flag_type(name: str, default):
    """argparse type of flag `name`: converts and checks against its field's `allowed`."""
    allowed, ok = FLAGS[name]["allowed"]
    if isinstance(default, bool):
        convert = {"true": True, "false": False}.get
    elif isinstance(default, tuple):
        def convert(text, kind=type(default[0])):
            return tuple(kind(v) for v in text.split(","))
    else:
        convert = type(default)

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        values = value if isinstance(value, tuple) else (value,)
        if value is None or (isinstance(default, tuple) and len(value) != len(default)) \
                or not all(ok(v) for v in values):
            shape = f"{len(default)} comma-separated values, each " if isinstance(default, tuple) else ""
            kind = type(default[0] if isinstance(default, tuple) else default)
            kind = f"{kind.__name__} " if kind in (int, float) else ""
            raise ConfigError(f"--{name}={text}: expected {shape}{kind}{allowed}")
        return value

    return parse


def parse_args(argv=None) -> Hyperparameters:
    """Every Hyperparameters field is a flag (--name=value); --preset picks the base values.
    Values are checked against each field's `allowed`: a bad one raises ConfigError naming the flag."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = _FlagParser(add_help=False)
    pre.add_argument("--preset", type=_flag_type("preset", "record"), default="record")
    preset = pre.parse_known_args(argv)[0].preset
    base = dataclasses.replace(Hyperparameters(), **PRESETS[preset], preset=preset)
    parser = _FlagParser(
        description="Train the speedrun GPT. Defaults are the 8x H100 record; --preset tiny is the CPU demo "
                    "(--preset tiny --help shows its values). Tuples are written A,B,C.")
    for f in dataclasses.fields(Hyperparameters):
        value = getattr(base, f.name)
        allowed = f.metadata["allowed"][0]
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value).lower() \
            if isinstance(value, bool) else value
        parser.add_argument(f"--{f.name}", type=_flag_type(f.name, value), default=None,
                            metavar="V", help=f"{f.metadata['help']} [{allowed}; default: {shown!s}]".replace("%", "%%"))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None and k != "preset"}
    for name in ("train_files", "val_files"):  # preset defaults are relative to the repository
        if name not in given and not os.path.isabs(getattr(base, name)):
            given[name] = str(REPO_DIR / getattr(base, name))
    return dataclasses.replace(base, **given)


# =====================================================================================
# 2. Kernels
# =====================================================================================

# --- 2a. Symmetric matmuls for Polar Express (Triton where the plan proved them) -------
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

# The Triton CPU interpreter (TRITON_INTERPRET=1: the tests, and tools/selfcheck.py on a
# CPU) runs the same kernels. It differs from a GPU in three ways, and the launchers (and
# _autotuned) handle each, so that no kernel has a branch for it:
# - no driver: autotuning cannot time configs, so each kernel family runs one fixed config
#   there (INTERPRETER_META);
# - its tl.dot is exact on fp32 operands only (bf16 and e4m3 ones give wrong results): the
#   launchers hand it fp32 copies of the operands (interpreter_operands);
# - its conversions to bf16 and e5m2 do not round to nearest: outputs the GPU writes in
#   e5m2 or bf16 are written in fp32 there, and torch rounds them (to nearest, as the GPU
#   does); the one rounding inside a kernel (the one-pass head's sigmoids) is to fp16,
#   which the interpreter rounds to nearest as the GPU does.
# The interpreter must be chosen before triton is imported, so this is read once.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETER_META = dict(  # the one config of each kernel family under the interpreter
    sym=dict(BLOCK_M=32, BLOCK_K=32),
    loss=dict(BLOCK_T=8, BLOCK_V=64),
    logits=dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, GROUP_M=4),
    mlp=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
)


def triton_interpreter() -> bool:
    """Whether the Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return _TRITON_INTERPRET


def interpreter_meta(family: str) -> dict:
    """Launch meta-parameters of a kernel family: the interpreter's fixed config, or none
    (the GPU's autotuner or the family's own config decides)."""
    return INTERPRETER_META[family] if _TRITON_INTERPRET else {}


def interpreter_operands(*tensors: Tensor) -> tuple:
    """The operands as a kernel gets them: themselves on a GPU, fp32 copies under the
    interpreter (its tl.dot is exact on fp32 only)."""
    return tuple(t.float() for t in tensors) if _TRITON_INTERPRET else tensors


def interpreter_output(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes an output of `dtype` in: fp32 under the interpreter, whose
    bf16 / e5m2 conversions do not round to nearest (torch rounds the fp32 result after)."""
    return torch.float32 if _TRITON_INTERPRET else dtype


if triton is not None:

    def _autotuned(tiles, key, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
        """triton.autotune over `tiles` ((block sizes..., num_warps, num_stages) each) per
        `key`; under the interpreter the kernel as it is (its launcher passes one config)."""
        def wrap(kernel):
            if _TRITON_INTERPRET:
                return kernel
            configs = [triton.Config({**dict(zip(names, t[:-2])), **({"GROUP_M": 8} if "BLOCK_N" in names else {})},
                                     num_warps=t[-2], num_stages=t[-1]) for t in tiles]
            return triton.autotune(configs=configs, key=key)(kernel)
        return wrap

    _sym_autotune = _autotuned([(128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3)],
                               key=["M", "K"], names=("BLOCK_M", "BLOCK_K"))

    @triton.jit
    def _sym_tile_ids(M, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        tiles = tl.cdiv(M, BLOCK_M)
        return tl.program_id(1).to(tl.int64), pid // tiles, pid % tiles

    @triton.jit
    def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of output tile `pid`: GROUP_M row tiles in a row share their W tiles in L2."""
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        rows_in_group = min(tiles_m - first_m, GROUP_M)
        return first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group, (pid % (GROUP_M * tiles_n)) // rows_in_group

    @triton.jit
    def _tile_matmul(X, W, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, offs_m, offs_n,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The (BLOCK_M, BLOCK_N) tile of X @ W^T at rows offs_m, columns offs_n, in fp32; X (M, K),
        W (N, K)."""
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # W^T tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        return acc

    @triton.jit
    def _sym_tile_rows_dot(A, M, K, stride_am, stride_ak, pid_m, pid_n,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 tile (rows pid_m, cols pid_n) of A @ A^T, A being an (M, K) matrix: _tile_matmul
        with W = A."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        return _tile_matmul(A, A, M, M, K, stride_am, stride_ak, stride_am, stride_ak, offs_m, offs_n,
                            BLOCK_M, BLOCK_M, BLOCK_K)

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
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        batch, pid_m, pid_n = _sym_tile_ids(M, BLOCK_M)
        if pid_n > pid_m:  # upper triangle: written by the mirrored tile
            return
        A += batch * stride_ab
        C += batch * stride_cb
        acc = _sym_tile_rows_dot(A, M, K, stride_am, stride_ak, pid_m, pid_n, BLOCK_M, BLOCK_K)
        _sym_tile_store(C, acc, M, stride_cm, stride_cn, pid_m, pid_n, BLOCK_M)

    @_sym_autotune
    @triton.jit
    def _ba_plus_caa_kernel(A, C, M, K, stride_ab, stride_am, stride_ak, stride_cb, stride_cm, stride_cn,
                            coef_b, coef_c,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        batch, pid_m, pid_n = _sym_tile_ids(M, BLOCK_M)
        if pid_n > pid_m:
            return
        A += batch * stride_ab
        C += batch * stride_cb
        acc = _sym_tile_rows_dot(A, M, K, stride_am, stride_ak, pid_m, pid_n, BLOCK_M, BLOCK_K)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        a_tile = tl.load(A + offs_m[:, None] * stride_am + offs_n[None, :] * stride_ak,
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < M), other=0.0)
        acc = acc * coef_c + a_tile.to(tl.float32) * coef_b  # b * A + c * (A @ A)
        _sym_tile_store(C, acc, M, stride_cm, stride_cn, pid_m, pid_n, BLOCK_M)


def _as_batched(t: Tensor) -> Tensor:
    return t if t.ndim == 3 else t.unsqueeze(0)


def _launch_sym(kernel, A: Tensor, out: Tensor, *scalars) -> Tensor:
    """The symmetric kernels' launcher (the interpreter's operands and output: see above)."""
    A3, = interpreter_operands(_as_batched(A))
    C3 = _as_batched(out)
    C3k = C3 if C3.dtype == interpreter_output(C3.dtype) else torch.empty_like(C3, dtype=torch.float32)
    batch, M, K = A3.shape
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) ** 2, batch)  # noqa: E731
    kernel[grid](A3, C3k, M, K, *A3.stride(), *C3k.stride(), *scalars, **interpreter_meta("sym"))
    if C3k is not C3:
        C3.copy_(C3k)
    return out


def XXT(A: Tensor, out: Tensor) -> Tensor:
    """Triton: out = A @ A^T for A of shape (m, n) or (B, m, n); out is (m, m) or (B, m, m)."""
    return _launch_sym(_xxt_kernel, A, out)


def ba_plus_cAA(A: Tensor, b: float, c: float, out: Tensor) -> Tensor:
    """Triton: out = b * A + c * A @ A for a symmetric A of shape (m, m) or (B, m, m)."""
    return _launch_sym(_ba_plus_caa_kernel, A, out, b, c)


def _sym_triton(A: Tensor, use_triton: bool) -> bool:
    """Whether the Triton kernel runs: when asked (RunPlan.sym_triton, or a test), except on
    `meta` tensors, where the PyTorch op stands in for it (shapes only, one op either way)."""
    if use_triton and triton is None:
        raise RuntimeError("the Triton symmetric matmuls need Triton")
    return use_triton and not A.is_meta


def sym_xxt(A: Tensor, out: Tensor | None = None, use_triton: bool = False) -> Tensor:
    """A @ A^T (batched over a leading dim if A is 3-D): the Triton kernel when use_triton
    (the plan's choice, proven at start-up), else PyTorch's matmul."""
    if _sym_triton(A, use_triton):
        if out is None:
            out = A.new_empty(*A.shape[:-1], A.size(-2))
        return XXT(A, out)
    return torch.matmul(A, A.mT, out=out)


def sym_ba_plus_caa(A: Tensor, b: float, c: float, out: Tensor | None = None,
                    use_triton: bool = False) -> Tensor:
    """b * A + c * A @ A for a symmetric A (2-D or batched 3-D): the Triton kernel when
    use_triton, else PyTorch's addmm."""
    if _sym_triton(A, use_triton):
        return ba_plus_cAA(A, b, c, torch.empty_like(A) if out is None else out)
    return (torch.baddbmm if A.ndim == 3 else torch.addmm)(A, A, A, beta=b, alpha=c, out=out)


# --- 2b. Attention backends (FlashAttention-3, FlexAttention, SDPA) ------------------
# Every backend computes the same thing on packed (varlen) sequences: q, k, v of shape
# (T, H, D) hold several documents back to back; cu_seqlens (int32) lists where each
# document starts (padded at the end with T). Query i sees key j iff both lie in the same
# document and i - window <= j <= i. The backend is chosen once at start-up, proven against
# SDPA (the start-up plan, 2f), and read from the plan by the model: no branch in the hot path.

# FlashAttention-3 from the Hugging Face kernel hub (`pip install 'kernels>=0.14,<1'`). The
# record loaded varunneal/flash-attention-3, which kernels 0.14+ refuses without
# trust_remote_code; the hub's maintained build has the same flash_attn_varlen_func.
# TRAIN_GPT_FA3_REPO picks another repository (outside kernels-community/ it is loaded with
# trust_remote_code=True, and the log says so).
FA3_DEFAULT_REPO, FA3_DEFAULT_VERSION = "kernels-community/flash-attn3", 1


def load_fa3() -> tuple[object, str]:
    """(flash_attn_interface, which build loaded) or (None, the one-line reason none did)."""
    repo = os.environ.get("TRAIN_GPT_FA3_REPO", FA3_DEFAULT_REPO)
    if repo == FA3_DEFAULT_REPO:
        kwargs = dict(version=FA3_DEFAULT_VERSION)
    else:
        kwargs = {} if repo.startswith("kernels-community/") else dict(trust_remote_code=True)
    what = repo + "".join(f", {k}={v}" for k, v in kwargs.items())
    try:
        from kernels import get_kernel
    except ImportError:
        return None, "the kernels package is not installed (pip install 'kernels>=0.14,<1')"
    try:
        return get_kernel(repo, **kwargs).flash_attn_interface, what
    except Exception as e:  # no network, no build for this torch/GPU, a refused repository
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        return None, f"cannot load {what} from the kernel hub ({type(e).__name__}: {reason})"


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


# --- 2c. FP8 lm_head ------------------------------------------------------------------
# Training-time lm_head matmul in FP8 (H100/H200, compute capability >= 8.9): x and w are
# scaled into e4m3, the gradient into e5m2; scaled matmuls accumulate in higher precision.
# The scales are fixed constants of the record (ALGORITHM.md 2.12).

FP8_X_SCALE = 100 / 448
FP8_W_SCALE = 1.6 / 448
FP8_GRAD_SCALE = 0.75 / 448


def _f32_scalar(value: float, like: Tensor) -> Tensor:
    # made on the device by a fill (no host-to-device copy); a constant once compiled
    return torch.full((), value, dtype=torch.float32, device=like.device)


def _fp8_quantize(x: Tensor, w: Tensor, x_s: float = FP8_X_SCALE, w_s: float = FP8_W_SCALE):
    return x.div(x_s).to(torch.float8_e4m3fn), w.div(w_s).to(torch.float8_e4m3fn)


def _fp8_mm_body(x: Tensor, w: Tensor, x_s: float, w_s: float):
    x_f8, w_f8 = _fp8_quantize(x, w, x_s, w_s)
    out = torch._scaled_mm(x_f8, w_f8.T, scale_a=_f32_scalar(x_s, x), scale_b=_f32_scalar(w_s, x),
                           out_dtype=torch.bfloat16, use_fast_accum=True)
    return out, x_f8, w_f8


def _fp8_mm_backward_body(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float):
    g_f8 = g.div(grad_s).to(torch.float8_e5m2)
    # grad_x = g @ w : (T, V) @ (V, d); the second operand must be column-major
    grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, scale_a=_f32_scalar(grad_s, g),
                              scale_b=_f32_scalar(w_s, g), out_dtype=torch.bfloat16, use_fast_accum=False)
    # grad_w = g.T @ x, computed as (x.T @ g).T : (d, T) @ (T, V)
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, scale_a=_f32_scalar(x_s, g),
                              scale_b=_f32_scalar(grad_s, g), out_dtype=torch.float32, use_fast_accum=False).T
    return grad_x, grad_w


_COMPILED_FP8 = {}


def _fp8_body(fn, compiled: bool):
    """The op body: compiled when the plan compiles (as in the record: the casts and
    transposes fuse into the scaling kernels; compiled lazily at the first call, so importing
    compiles nothing), plain PyTorch otherwise (CPU tests)."""
    if not compiled:
        return fn
    if fn not in _COMPILED_FP8:
        _COMPILED_FP8[fn] = maybe_compile(fn, True)
    return _COMPILED_FP8[fn]


@torch.library.custom_op("train_gpt::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float,
           compiled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """out = x @ w.T in FP8; also returns the FP8 copies of x and w for the backward.
    compiled: the op bodies through torch.compile (RunPlan.compile)."""
    return _fp8_body(_fp8_mm_body, compiled)(x, w, x_s, w_s)


@fp8_mm.register_fake
def _(x, w, x_s, w_s, grad_s, compiled=False):
    return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16),
            torch.empty_like(x, dtype=torch.float8_e4m3fn), torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("train_gpt::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float, grad_s: float,
                    compiled: bool = False) -> tuple[Tensor, Tensor]:
    return _fp8_body(_fp8_mm_backward_body, compiled)(g, x_f8, w_f8, x_s, w_s, grad_s)


@fp8_mm_backward.register_fake
def _(g, x_f8, w_f8, x_s, w_s, grad_s, compiled=False):
    # grad_w is the transpose of a contiguous (d, V) product: column-major strides (1, V)
    V, d = w_f8.shape
    return (torch.empty_like(x_f8, dtype=torch.bfloat16),
            torch.empty_strided((V, d), (1, V), dtype=torch.float32, device=w_f8.device))


def _fp8_mm_backward(ctx, grad_out, *_):
    x_f8, w_f8 = ctx.saved_tensors
    grad_x, grad_w = torch.ops.train_gpt.fp8_mm_backward(grad_out, x_f8, w_f8, *ctx.scales, ctx.compiled)
    return grad_x, grad_w, None, None, None, None


def _fp8_mm_setup_context(ctx, inputs, output):
    _, _, x_s, w_s, grad_s, *compiled = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.scales = (x_s, w_s, grad_s)
    ctx.compiled = bool(compiled and compiled[0])
    ctx.set_materialize_grads(False)


fp8_mm.register_autograd(_fp8_mm_backward, setup_context=_fp8_mm_setup_context)


# --- 2d. Fused loss head: one pass over the logits, its gradient written in FP8 ------
# The training head as one op from the final hidden states x (T, d) to the summed
# multi-token loss. The loss kernel (_mtp_loss_grad_kernel) reads each row once more for
# the loss's picked terms and the gradient with respect to the raw logits, which it writes
# straight to e5m2, already multiplied by grad_scale / grad_s, in the row-major (T, V) layout
# grad_x's FP8 matmul needs and the (V, T) one grad_w's needs. It comes in two forms:
# - one pass (the default): the lm_head matmul is a Triton FP8 matmul (_fp8_logits_kernel)
#   whose epilogue computes the softcap's sigmoid s = sigmoid((l + 5) / 7.5) of each fp32
#   logit l, stores s in fp16 in place of the logits, and sums exp(23 s) over each 64
#   columns of its tile. The loss kernel reads s once: z = 23 s, softcap'(l) = (23 / 7.5)
#   s (1 - s), and one exp per element for the softmax. Special-function ops per (T, V)
#   element: 3 in the epilogue (sigmoid's exp and reciprocal, exp(z)) and 1 in the loss
#   kernel (tools/kernel_report.py counts them in the sm90 code);
# - two passes: the matmul is cuBLAS's (as 2c), writing bf16 logits, and the loss kernel
#   reads them twice, first for the log-sum-exp (3 + 3 special-function ops per element).
# The logits (or sigmoids) are freed when the op returns; the backward is just the two FP8
# matmuls. Same math as the unfused head (mtp_loss's formulas) up to rounding: the gradient
# is rounded to e5m2 once, not through bf16 first; the one-pass head rounds the sigmoid to
# fp16 (z to within 23 * 2^-12 = 0.0056) where the unfused head rounds the logit to bf16
# (z to within 0.0075), and accumulates in full fp32 (ALGORITHM.md 7 gives the errors). Per
# (T, V) element, counting every write and every non-matmul read: one pass 2 (sigmoids) + 2
# (one read) + 1 + 1 (two e5m2 layouts) = 6 bytes, two passes 8, against 12 for the unfused
# head (tools/preflight.py --roofline counts them).
FUSED_LOSS_MAX_K = 3  # multi-token predictions the kernel handles (the weights are padded to it)
# the fused forms, in the order --fused_loss=on prefers: the roofline model (tools/preflight.py)
# prices one pass lower on every roof (6 bytes and 4 special-function ops per (T, V) element
# against 8 and 6, the matmul the same); under auto the start-up timing decides
FUSED_LOSS_PATHS = ("one pass", "two passes")
LSE_COLUMNS = 64  # the one-pass matmul's partial sums: one per row and per 64 columns

if triton is not None:

    # (BLOCK_T, BLOCK_V, num_warps, num_stages): each holds 2+ blocks per SM at the record's
    # shapes (tools/kernel_report.py); the kernel only writes its outputs, so the autotuner
    # may run a config twice
    _loss_autotune = _autotuned([(8, 256, 4, 3), (16, 256, 4, 3), (8, 512, 4, 3), (4, 512, 4, 3), (16, 128, 4, 3)],
                                key=["T", "V", "ONE_PASS"], names=("BLOCK_T", "BLOCK_V"))

    @triton.jit
    def _softcap_s(x, GIVEN: tl.constexpr):
        """The softcap's sigmoid s = sigmoid((l + 5) / 7.5) (z = 23 s): x itself where it is
        given (the one-pass matmul's fp16 s), else of the logit x."""
        if GIVEN:
            return x
        return tl.sigmoid((x + 5.0) * (1.0 / 7.5))

    @triton.jit
    def _z_at(x_in, rows64, V, cols, ok, ONE_PASS: tl.constexpr):
        """z = 23 s of each row at one column (the loss kernel's rows, where ok)."""
        return 23.0 * _softcap_s(tl.load(x_in + rows64 * V + cols, mask=ok, other=0.0).to(tl.float32), ONE_PASS)

    @_loss_autotune
    @triton.jit
    def _mtp_loss_grad_kernel(x_in, targets, weights, partial, loss_out, g_out, gt_out, scale_ptr, T, V, P,
                              BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, ONE_PASS: tl.constexpr):
        """Rows [pid*BLOCK_T, +BLOCK_T): loss_out[t] = W_t lse_t - sum_k w_k z[t, target_{t+k}]
        and g[t, v] = (W_t softmax(z)[v] - sum_k w_k [v == target_{t+k}]) (23 / 7.5) s (1 - s)
        * scale, with s = sigmoid((l + 5) / 7.5), z = 23 s and W_t = sum_k w_k [t + k < T];
        g at g_out (T, V) and gt_out (V, T), rounded to their dtype (e5m2: to nearest,
        cvt.rn.satfinite on sm90). ONE_PASS: x_in holds s (the one-pass matmul's fp16) and
        sum_v exp(z) of row t is the sum of partial[t, :P]; else x_in holds the logits l
        (bf16), read twice, the first time for that sum."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        # sum_v exp(z). z = 23 s lies in (0, 23), so no max is needed
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if ONE_PASS:
            for p0 in range(0, P, BLOCK_V):
                cols = p0 + tl.arange(0, BLOCK_V)
                ok = row_ok[:, None] & (cols[None, :] < P)
                total += tl.sum(tl.load(partial + rows64[:, None] * P + cols[None, :], mask=ok, other=0.0), axis=1)
        else:  # pass 1
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                ok = row_ok[:, None] & (cols[None, :] < V)
                x = tl.load(x_in + rows64[:, None] * V + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                z = 23.0 * _softcap_s(x, False)
                total += tl.sum(tl.where(ok, tl.exp(z), 0.0), axis=1)
        lse = tl.log(tl.where(row_ok, total, 1.0))
        # the targets of offsets 0, 1, 2 and their weights (0 past the end, or past K)
        ok0, ok1, ok2 = row_ok, row_ok & (rows + 1 < T), row_ok & (rows + 2 < T)
        t0 = tl.load(targets + rows, mask=ok0, other=-1)
        t1 = tl.load(targets + rows + 1, mask=ok1, other=-1)
        t2 = tl.load(targets + rows + 2, mask=ok2, other=-1)
        w0 = tl.where(ok0, tl.load(weights), 0.0)
        w1 = tl.where(ok1, tl.load(weights + 1), 0.0)
        w2 = tl.where(ok2, tl.load(weights + 2), 0.0)
        W = w0 + w1 + w2
        scale = tl.load(scale_ptr)
        # the picked softcapped logits z[t, target_{t+k}], read at the targets
        picked = w0 * _z_at(x_in, rows64, V, t0, ok0, ONE_PASS) + w1 * _z_at(x_in, rows64, V, t1, ok1, ONE_PASS) \
            + w2 * _z_at(x_in, rows64, V, t2, ok2, ONE_PASS)
        # the pass over the row: the e5m2 gradient
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols[None, :] < V)
            x = tl.load(x_in + rows64[:, None] * V + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            s = _softcap_s(x, ONE_PASS)
            dz = W[:, None] * tl.exp(23.0 * s - lse[:, None])
            dz = dz - tl.where(cols[None, :] == t0[:, None], w0[:, None], 0.0) \
                - tl.where(cols[None, :] == t1[:, None], w1[:, None], 0.0) \
                - tl.where(cols[None, :] == t2[:, None], w2[:, None], 0.0)
            g = (dz * (23.0 / 7.5) * s * (1.0 - s) * scale).to(g_out.dtype.element_ty)
            tl.store(g_out + rows64[:, None] * V + cols[None, :], g, mask=ok)
            tl.store(gt_out + cols[None, :].to(tl.int64) * T + rows64[:, None], g, mask=ok)
        tl.store(loss_out + rows, W * lse - picked, mask=row_ok)

    def _matmul_autotune(tiles):
        """_autotuned over (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tiles, per (M, N, K)."""
        return _autotuned(tiles, key=["M", "N", "K"])

    # FP8 operands: K tiles of 128 bytes. 128x128x128 in 2 stages holds 2 blocks per SM, so
    # one block's epilogue overlaps another's main loop (tools/kernel_report.py)
    @_matmul_autotune([(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 8, 2), (64, 256, 128, 8, 4),
                       (128, 256, 64, 8, 4)])
    @triton.jit
    def _fp8_logits_kernel(X, W, OUT, PARTIAL, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, LSE_COLS: tl.constexpr):
        """With l = X @ W^T * scale in fp32 (X (M, K) and W (N, K) in e4m3): OUT = fp16(s), the
        softcap's sigmoid s = sigmoid((l + 5) / 7.5), and in the same epilogue the first half
        of the loss: PARTIAL[m, j] = sum of exp(23 OUT[m, n]) over the LSE_COLS columns n of
        block j, from the rounded fp16 values (what the loss kernel reads back)."""
        pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _tile_matmul(X, W, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, offs_m, offs_n,
                           BLOCK_M, BLOCK_N, BLOCK_K)
        s = _softcap_s(acc * scale, False).to(OUT.dtype.element_ty)
        ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], s, mask=ok)
        e = tl.where(ok, tl.exp(23.0 * s.to(tl.float32)), 0.0)
        sums = tl.sum(tl.reshape(e, (BLOCK_M, BLOCK_N // LSE_COLS, LSE_COLS)), axis=2)
        n_blocks = tl.cdiv(N, LSE_COLS)
        cols = pid_n * (BLOCK_N // LSE_COLS) + tl.arange(0, BLOCK_N // LSE_COLS)
        tl.store(PARTIAL + offs_m[:, None].to(tl.int64) * n_blocks + cols[None, :], sums,
                 mask=(offs_m[:, None] < M) & (cols[None, :] < n_blocks))


# what the loss kernel moves per (T, V) element, by whether it is given the log-sum-exp's
# partial sums (one pass: reads the fp16 sigmoids once) or not (the bf16 logits twice); it
# writes e5m2 twice
MTP_KERNEL_BYTES_PER_ELEMENT = {True: dict(read=2, write=2 * 1), False: dict(read=2 * 2, write=2 * 1)}


@torch.library.custom_op("train_gpt::mtp_loss_grad_e5m2", mutates_args=())
def mtp_loss_grad_e5m2(x_in: Tensor, targets: Tensor, weights: Tensor, scale: Tensor,
                       partial: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The loss kernel: (per-row loss (T,) fp32, g (T, V) e5m2, g^T (V, T) e5m2), g =
    dloss/dlogits * scale (a 0-d fp32 device tensor); weights has at most 3 entries. One
    pass: x_in the fp16 sigmoids and partial (T, P) fp32 the sums of exp(23 s) of
    fp8_sigmoid_lse; two passes: x_in the bf16 logits and P = 0 (the kernel reads them twice)."""
    T, V = x_in.shape
    w = torch.zeros(FUSED_LOSS_MAX_K, dtype=torch.float32, device=x_in.device)
    w[:weights.numel()] = weights
    loss = torch.empty(T, dtype=torch.float32, device=x_in.device)
    # the interpreter's operands and outputs: see the top of the kernels section
    out_dtype = interpreter_output(torch.float8_e5m2)
    g = torch.empty(T, V, dtype=out_dtype, device=x_in.device)
    gt = torch.empty(V, T, dtype=out_dtype, device=x_in.device)
    x, = interpreter_operands(x_in)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]),)  # noqa: E731
    _mtp_loss_grad_kernel[grid](x, targets, w, partial, loss, g, gt, scale, T, V, partial.size(1),
                                ONE_PASS=partial.size(1) > 0, **interpreter_meta("loss"))
    return loss, g.to(torch.float8_e5m2), gt.to(torch.float8_e5m2)


@mtp_loss_grad_e5m2.register_fake
def _(x_in, targets, weights, scale, partial):
    T, V = x_in.shape
    return (x_in.new_empty(T, dtype=torch.float32), x_in.new_empty(T, V, dtype=torch.float8_e5m2),
            x_in.new_empty(V, T, dtype=torch.float8_e5m2))


@torch.library.custom_op("train_gpt::fp8_sigmoid_lse", mutates_args=())
def fp8_sigmoid_lse(x_f8: Tensor, w_f8: Tensor) -> tuple[Tensor, Tensor]:
    """The one-pass matmul: (fp16 sigmoids s = sigmoid((l + 5) / 7.5) of the logits l = x @
    w^T * x_s * w_s (T, V), partial (T, V / 64) sums of exp(23 s) per 64 columns) from x
    (T, d) and w (V, d) in e4m3."""
    T, d = x_f8.shape
    V = w_f8.size(0)
    out = torch.empty(T, V, dtype=torch.float16, device=x_f8.device)  # the interpreter rounds to fp16 to nearest
    partial = torch.empty(T, triton.cdiv(V, LSE_COLUMNS), dtype=torch.float32, device=x_f8.device)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(V, m["BLOCK_N"]),)  # noqa: E731
    x, w = interpreter_operands(x_f8, w_f8)  # e4m3 values are exact in fp32
    _fp8_logits_kernel[grid](x, w, out, partial, T, V, d, *x.stride(), *w.stride(), FP8_X_SCALE * FP8_W_SCALE,
                             LSE_COLS=LSE_COLUMNS, **interpreter_meta("logits"))
    return out, partial


@fp8_sigmoid_lse.register_fake
def _(x_f8, w_f8):
    T, V = x_f8.size(0), w_f8.size(0)
    return (x_f8.new_empty(T, V, dtype=torch.float16),
            x_f8.new_empty(T, (V + LSE_COLUMNS - 1) // LSE_COLUMNS, dtype=torch.float32))


def _fused_head_forward_body(x: Tensor, w: Tensor, targets: Tensor, weights: Tensor, grad_scale: float,
                             one_pass: bool, compiled: bool):
    if one_pass:
        x_f8, w_f8 = _fp8_body(_fp8_quantize, compiled)(x, w)
        x_in, partial = fp8_sigmoid_lse(x_f8, w_f8)  # what the loss kernel reads: the fp16 sigmoids
    else:
        x_in, x_f8, w_f8 = _fp8_body(_fp8_mm_body, compiled)(x, w, FP8_X_SCALE, FP8_W_SCALE)  # or the bf16 logits
        partial = x.new_empty(x.size(0), 0, dtype=torch.float32)
    scale = _f32_scalar(grad_scale / FP8_GRAD_SCALE, x)
    loss, g, gt = mtp_loss_grad_e5m2(x_in, targets, weights, scale, partial)
    return loss.sum(), g, gt, x_f8, w_f8


def _fused_head_backward_body(g: Tensor, gt: Tensor, x_f8: Tensor, w_f8: Tensor, g_scale: Tensor):
    # grad_x = g @ w (T, V) @ (V, d), w column-major; grad_w = (x^T @ g)^T with g column-major,
    # which is g^T (V, T) row-major; g_scale turns the e5m2 values back into dloss/dlogits
    grad_x = torch._scaled_mm(g, w_f8.T.contiguous().T, scale_a=g_scale, scale_b=_f32_scalar(FP8_W_SCALE, g),
                              out_dtype=torch.bfloat16, use_fast_accum=False)
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), gt.T, scale_a=_f32_scalar(FP8_X_SCALE, g), scale_b=g_scale,
                              out_dtype=torch.float32, use_fast_accum=False).T
    return grad_x, grad_w


@torch.library.custom_op("train_gpt::fused_loss_head", mutates_args=())
def fused_loss_head_op(x: Tensor, w: Tensor, targets: Tensor, weights: Tensor, grad_scale: float,
                       one_pass: bool, compiled: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(summed multi-token loss, e5m2 gradient (T, V) and (V, T), x and w in e4m3)."""
    return _fused_head_forward_body(x, w, targets, weights, grad_scale, one_pass, compiled)


@fused_loss_head_op.register_fake
def _(x, w, targets, weights, grad_scale, one_pass, compiled=False):
    T, V = x.size(0), w.size(0)
    return (x.new_empty((), dtype=torch.float32), x.new_empty(T, V, dtype=torch.float8_e5m2),
            x.new_empty(V, T, dtype=torch.float8_e5m2), torch.empty_like(x, dtype=torch.float8_e4m3fn),
            torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("train_gpt::fused_loss_head_backward", mutates_args=())
def fused_loss_head_backward(g: Tensor, gt: Tensor, x_f8: Tensor, w_f8: Tensor, g_scale: Tensor,
                             compiled: bool = False) -> tuple[Tensor, Tensor]:
    return _fp8_body(_fused_head_backward_body, compiled)(g, gt, x_f8, w_f8, g_scale)


@fused_loss_head_backward.register_fake
def _(g, gt, x_f8, w_f8, g_scale, compiled=False):
    V, d = w_f8.shape
    return (torch.empty_like(x_f8, dtype=torch.bfloat16),
            torch.empty_strided((V, d), (1, V), dtype=torch.float32, device=w_f8.device))


def _fused_head_setup_context(ctx, inputs, output):
    ctx.grad_scale = inputs[4]
    ctx.compiled = len(inputs) > 6 and bool(inputs[6])
    ctx.save_for_backward(*output[1:])
    ctx.set_materialize_grads(False)


def _fused_head_backward(ctx, grad_loss, *_):
    g, gt, x_f8, w_f8 = ctx.saved_tensors
    # the e5m2 values are dloss/dlogits * grad_scale / grad_s; an incoming gradient other
    # than grad_scale is folded into the scale (a 0-d device tensor: no host sync). For the
    # trainer's 1/grad_accum, a power of 2, g_scale is grad_s exactly.
    g_scale = grad_loss.float() * (FP8_GRAD_SCALE / ctx.grad_scale)
    grad_x, grad_w = torch.ops.train_gpt.fused_loss_head_backward(g, gt, x_f8, w_f8, g_scale, ctx.compiled)
    return grad_x, grad_w, None, None, None, None, None


fused_loss_head_op.register_autograd(_fused_head_backward, setup_context=_fused_head_setup_context)


def fused_loss_head(x: Tensor, w: Tensor, targets: Tensor, weights: Tensor, grad_scale: float,
                    one_pass: bool = True, compiled: bool = False) -> Tensor:
    """The training loss (as mtp_loss of the FP8 head's logits) through the fused op, in one
    pass over the logits or two; its backward expects `grad_scale` as the incoming gradient
    (other values are handled)."""
    return fused_loss_head_op(x, w, targets, weights, grad_scale, one_pass, compiled)[0]


# --- 2e. Fused MLP: the first matmul with ReLU^2 in its epilogue ---------------------
# The MLP is h = relu(x @ c_fc^T)^2, out = h @ c_proj. Unfused, the first matmul writes the
# pre-activation (T, 4d), a pointwise kernel reads it and writes h, and the backward reads
# the pre-activation again (it is kept for relu^2's derivative). Here one Triton matmul
# applies relu^2 to its fp32 accumulator before the store, so only h is written; in the
# backward, the matmul forming dh = grad_out @ c_proj^T applies the derivative in its
# epilogue, d(pre) = dh * 2 relu(pre), recovering relu(pre) as sqrt(h), so the
# pre-activation is never stored: h is the one (T, 4d) tensor kept. The weight and input
# gradients stay cuBLAS matmuls. Same math up to rounding: the pre-activation and dh are
# not rounded to bf16 before the epilogue, and relu(pre) comes from the bf16 h.
if triton is not None:

    @triton.jit
    def _mlp_matmul_kernel(X, W, H, OUT, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, BACKWARD: tl.constexpr):
        """acc = X @ W^T for X (M, K), W (N, K) in fp32 (2a's tile helpers). Forward:
        OUT = relu(acc)^2. Backward (H the forward's output, same strides as OUT):
        OUT = acc * 2 sqrt(H)."""
        pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _tile_matmul(X, W, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, offs_m, offs_n,
                           BLOCK_M, BLOCK_N, BLOCK_K)
        ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        out_offs = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        if BACKWARD:
            h = tl.load(H + out_offs, mask=ok, other=0.0).to(tl.float32)
            out = acc * 2.0 * tl.sqrt(h)
        else:
            r = tl.maximum(acc, 0.0)
            out = r * r
        tl.store(OUT + out_offs, out.to(OUT.dtype.element_ty), mask=ok)

    # Forward and backward are tuned apart: they have the same (M, N, K) but not the same
    # epilogue (the backward loads H), and the backward's 128x256 tile spills at the record's
    # shapes (tools/kernel_report.py), so each direction has its own configs and tuning.
    _mlp_fwd_kernel = _matmul_autotune([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                                        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)])(_mlp_matmul_kernel)
    _mlp_bwd_kernel = _matmul_autotune([(128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3),
                                        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)])(_mlp_matmul_kernel)


def _mlp_matmul(x: Tensor, w: Tensor, h: Tensor | None = None) -> Tensor:
    """relu(x @ w^T)^2 (h None), or (x @ w^T) * 2 sqrt(h): one Triton matmul, x (M, K), w (N, K)."""
    M, K = x.shape
    N = w.size(0)
    dtype = x.dtype
    out = x.new_empty(M, N, dtype=interpreter_output(dtype))
    x, w, *h = interpreter_operands(x, w, *([] if h is None else [h]))  # see the top of the kernels section
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
    kernel = _mlp_bwd_kernel if h else _mlp_fwd_kernel
    kernel[grid](x, w, h[0] if h else out, out, M, N, K, *x.stride(), *w.stride(), *out.stride(),
                 BACKWARD=bool(h), **interpreter_meta("mlp"))
    return out.to(dtype)


@torch.library.custom_op("train_gpt::mlp_up_relu2", mutates_args=())
def mlp_up_relu2(x: Tensor, w: Tensor) -> Tensor:
    """h = relu(x @ w^T)^2 in one Triton matmul (the pre-activation is never stored)."""
    return _mlp_matmul(x, w)


@mlp_up_relu2.register_fake
def _(x, w):
    return x.new_empty(x.size(0), w.size(0))


@torch.library.custom_op("train_gpt::mlp_down_relu2_grad", mutates_args=())
def mlp_down_relu2_grad(g: Tensor, w: Tensor, h: Tensor) -> Tensor:
    """d(pre) = (g @ w^T) * 2 sqrt(h) in one Triton matmul: relu^2's derivative, from h."""
    return _mlp_matmul(g, w, h)


@mlp_down_relu2_grad.register_fake
def _(g, w, h):
    return torch.empty_like(h)


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, c_fc: Tensor, c_proj: Tensor) -> Tensor:
        h = torch.ops.train_gpt.mlp_up_relu2(x, c_fc)
        ctx.save_for_backward(x, c_fc, c_proj, h)
        return h @ c_proj

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, c_fc, c_proj, h = ctx.saved_tensors
        d_pre = torch.ops.train_gpt.mlp_down_relu2_grad(grad_out, c_proj, h)
        return d_pre @ c_fc, d_pre.mT @ x, h.mT @ grad_out


def fused_mlp(x: Tensor, c_fc: Tensor, c_proj: Tensor) -> Tensor:
    """relu(x @ c_fc^T)^2 @ c_proj with the Triton matmuls above (forward and backward)."""
    return _FusedMLP.apply(x, c_fc, c_proj)


def unfused_mlp(x: Tensor, c_fc: Tensor, c_proj: Tensor) -> Tensor:
    """The record's MLP: the reference path."""
    return F.relu(F.linear(x, c_fc)).square() @ c_proj


# --- 2f. The start-up plan: what this machine runs, each fast path proven first -------
# Every choice that depends on the machine is made once, before the clock, by resolve_plan
# and held in one immutable RunPlan that build_model, the optimizers and the Trainer read
# (and tools/bench.py, tools/preflight.py, tools/selfcheck.py). A fast path that `auto` could
# take (an attention backend other than SDPA, the FP8 head, the fused loss head in one pass
# or two, the fused MLP, the Triton symmetric matmuls) is taken only if:
#   1. it runs at the run's shapes (the largest micro-batch) inside a guard: any exception
#      (a compile error, OutOfResources, a CUDA error, a missing symbol) drops it, with the
#      exception's first line as the reason;
#   2. its outputs equal its reference path's on the same inputs within PROOF_TOLERANCES
#      (relative errors, ALGORITHM.md section 7); a NaN or a miss drops it;
#   3. it passed on every rank (one all_gather of the results), so no rank ever runs another
#      kernel than its peers;
#   4. for the fused paths and the symmetric matmuls: rank 0's median of PLAN_SAMPLES
#      timings beats the reference's by PLAN_MARGIN (every rank takes rank 0's choice).
# auto takes fast paths on CUDA only (on the CPU the reference paths are the fast ones;
# tools/selfcheck.py proves the Triton kernels there under TRITON_INTERPRET=1). A forced
# `on` skips the timing, but not the check: a failure is one ConfigError naming the path.

# relative errors (Frobenius norms, float64) a fast path may have against its reference
# path: about twice the largest the tests measured (ALGORITHM.md section 7 lists them)
PROOF_TOLERANCES = {
    "attention": 2e-2,  # out, dq, dk, dv vs SDPA in float32 (bf16 inputs: ~4e-3)
    "fp8 head": 0.15,  # out, grad_x, grad_w vs the bf16 linear (e4m3 / e5m2 rounding: up to 6e-2)
    "loss": 1e-4,  # the fused loss head's summed loss vs the unfused FP8 head (2e-5)
    "loss grads": 0.1,  # its grad_x, grad_w (e5m2 rounded once vs through bf16: 5e-3 to 4.5e-2)
    "mlp": 2e-2,  # the fused MLP's output and three gradients vs the unfused MLP (8e-3)
    "sym": 1e-2,  # the Triton symmetric matmuls vs torch's A @ A^T and b A + c A A (bf16: 4e-3)
}
PLAN_MARGIN = 0.02  # a fused path must be this much faster than its reference to be taken
PLAN_SAMPLES = 7  # timing samples per path (the median decides), each of PLAN_ITERS calls
PLAN_ITERS = 3


@dataclass(frozen=True)
class Machine:
    """What the plan's choices depend on: the device, whether it is a CUDA GPU and its
    compute capability, Triton and its CPU interpreter. Machine.of(device) reads them; the
    preflight and the tests describe other machines."""
    device: torch.device
    cuda: bool = False
    capability: tuple = (0, 0)
    triton: bool = False
    interpret: bool = False

    @staticmethod
    def of(device) -> Machine:
        if isinstance(device, Machine):
            return device
        device = torch.device(device)
        cuda = device.type == "cuda"
        return Machine(device, cuda, torch.cuda.get_device_capability(device) if cuda else (0, 0),
                       triton is not None, triton_interpreter())

    @staticmethod
    def record_gpu(device="meta") -> Machine:
        """An H100 (sm90) with Triton, as the record runs on; `meta` for the preflight."""
        return Machine(torch.device(device), True, (9, 0), True, False)


@dataclass(frozen=True)
class RunPlan:
    """Every machine-dependent choice of a run, resolved once (resolve_plan) and read
    everywhere; the defaults are the reference paths. `rows` (choice, value, why) are the
    log's table; attn_fn is the backend's function (attn_backend names it)."""
    device: torch.device
    world_size: int = 1
    act_dtype: torch.dtype = torch.float32
    ortho_dtype: torch.dtype = torch.float32
    compile: bool = False
    attn_backend: str = "sdpa"
    attn_fn: Callable = dataclasses.field(default=attention_sdpa, compare=False)
    fp8: bool = False
    fused_loss: str | None = None  # None, or one of FUSED_LOSS_PATHS
    fused_mlp: bool = False
    sym_triton: bool = False
    grad_sum_dtype: torch.dtype | None = None
    loss_every: int = 1  # read (and log) the training loss every N steps
    interpret: bool = False
    rows: tuple = dataclasses.field(default=(), compare=False)
    proofs: tuple = dataclasses.field(default=(), compare=False)  # every Proof resolve_plan made
    timings: tuple = dataclasses.field(default=(), compare=False)  # (choice, {path: (ms, failure)})

    @property
    def grad_accum(self) -> int:
        return VIRTUAL_RANKS // self.world_size

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def meta(self) -> bool:
        return self.device.type == "meta"

    def sync(self) -> None:
        """Wait for the device (a no-op off CUDA)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def table(self) -> str:
        width = max(len(c) for c, _, _ in self.rows)
        vwidth = max(len(v) for _, v, _ in self.rows)
        return "\n".join(f"  {c:<{width}}  {v:<{vwidth}}  {why}" for c, v, why in self.rows)


def _name(dtype) -> str:
    return "p.grad" if dtype is None else str(dtype).removeprefix("torch.")


def grad_sum_dtype(setting: str, machine, world_size: int) -> torch.dtype | None:
    """--grad_sum_dtype resolved: None = autograd's own p.grad, in each parameter's dtype.

    auto: float64 on CPU, where it makes 1, 2, 4 and 8 processes bitwise identical (see
    GradSums); on GPU p.grad with one micro-batch per rank (the record on 8 GPUs: nothing
    to sum) and float32 with gradient accumulation.
    """
    if setting == "auto":
        cuda = machine.cuda if isinstance(machine, Machine) else torch.device(machine).type == "cuda"
        if not cuda:
            return torch.float64
        return None if VIRTUAL_RANKS // world_size == 1 else torch.float32
    if setting == "param":
        return None
    if setting in ("float32", "float64"):
        return getattr(torch, setting)
    raise ValueError(f"--grad_sum_dtype={setting}: expected one of {', '.join(GRAD_SUM_DTYPES)}")


def base_plan(args: Hyperparameters, machine, world_size: int = 1) -> RunPlan:
    """The choices that need no proof (dtypes, compile, gradient sums, the loss cadence),
    every fast path at its reference: what resolve_plan starts from."""
    m = Machine.of(machine)
    act = torch.bfloat16 if m.cuda else torch.float32
    compiled = args.compile == "on" or (args.compile == "auto" and m.cuda)
    sums = grad_sum_dtype(args.grad_sum_dtype, m, world_size)
    where = "GPU, as the record" if m.cuda else f"{m.device.type}: bf16 matmuls are ~10x slower there"
    rows = (("device", str(m.device), f"--device={args.device}" + (f", sm{m.capability[0]}{m.capability[1]}"
                                                                   if m.cuda else "")),
            ("activations", _name(act), where),
            ("Polar Express dtype", _name(act), where),
            ("torch.compile", "on" if compiled else "off", f"--compile={args.compile}"
             + ("" if args.compile != "auto" else " (on for CUDA)")),
            ("gradient sums", _name(sums), f"--grad_sum_dtype={args.grad_sum_dtype}, "
                                           f"{VIRTUAL_RANKS // world_size} micro-batch(es) per rank"),
            ("loss read every", f"{25 if m.cuda else 1} step(s)", "reading it waits for the GPU" if m.cuda
             else "the CPU: no wait"),
            ("Triton interpreter", "on" if m.interpret else "off", "TRITON_INTERPRET=" + ("1" if m.interpret else "unset")))
    return RunPlan(m.device, world_size, act, act, compiled, grad_sum_dtype=sums, loss_every=25 if m.cuda else 1,
                   interpret=m.interpret, rows=rows)


# --- what each fast path needs of the machine --------------------------------------------

def _try_backend(name: str, machine):
    """(function, None, what loaded) if attention backend `name` can run on this machine,
    else (None, reason, "")."""
    m = Machine.of(machine)
    if name == "sdpa":
        return attention_sdpa, None, ""
    if name == "flex":
        if not m.cuda:
            return None, "FlexAttention has no backward on CPU", ""
        return attention_flex, None, ""
    if name == "varlen":
        if m.capability[0] < 8:
            return None, "varlen_attn needs an sm80+ CUDA GPU", ""
        try:
            import inspect
            from torch.nn.attention.varlen import varlen_attn
            params = inspect.signature(varlen_attn).parameters
            if "scale" not in params or "window_size" not in params:
                return None, "this torch's varlen_attn lacks scale/window_size", ""
        except ImportError:
            return None, "torch.nn.attention.varlen is not in this torch", ""
        return attention_varlen, None, ""
    if name == "fa3":
        if m.capability[0] != 9:
            return None, "FlashAttention-3 needs a Hopper (sm90) GPU", ""
        fa3, what = load_fa3()
        if fa3 is None:
            return None, what, ""
        return _make_fa3_attention(fa3), None, f" ({what})"
    raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(ATTENTION_BACKENDS)}")


def forced_attention_backend(name: str, machine):
    """(function, what loaded) of --attn_backend=name; ConfigError if it cannot run here."""
    fn, why, what = _try_backend(name, machine)
    if fn is None:
        raise ConfigError(f"--attn_backend={name} cannot run here: {why}")
    return fn, what


def fp8_supported(machine) -> tuple[bool, str]:
    """(supported, reason): the reason says why not."""
    m = Machine.of(machine)
    if not m.cuda:
        return False, f"FP8 lm_head needs a CUDA GPU (device is {m.device.type})"
    if tuple(m.capability) < (8, 9):
        return False, f"FP8 lm_head needs compute capability >= 8.9, this GPU has {m.capability[0]}.{m.capability[1]}"
    return True, ""


def fp8_setting(setting: str, machine) -> tuple[bool, str]:
    """--fp8 on this machine: (may the FP8 head be used, reason when not). ConfigError for
    --fp8=on where FP8 cannot run."""
    if setting == "off":
        return False, "--fp8=off"
    ok, why = fp8_supported(machine)
    if not ok and setting == "on":
        raise ConfigError(f"--fp8=on: {why}")
    return ok, why


def triton_available(machine, what: str) -> tuple[bool, str]:
    """(available, reason): a Triton kernel path needs Triton on CUDA (or its CPU interpreter)."""
    m = Machine.of(machine)
    if not m.triton:
        return False, f"{what} needs Triton"
    if not m.cuda and not m.interpret:
        return False, f"{what} needs a CUDA GPU or TRITON_INTERPRET=1 (device is {m.device.type})"
    return True, ""


def fused_loss_available(args, machine) -> tuple[bool, str]:
    """(available, reason) for --fused_loss: Triton, and the FP8 head it fuses (--fp8 not off
    and a GPU with FP8)."""
    ok, why = triton_available(machine, "fused loss head")
    if ok and (args.fp8 == "off" or not fp8_supported(machine)[0]):
        return False, "the fused loss head is the FP8 head's, and FP8 is off here"
    return ok, why


def fused_mlp_available(args, machine) -> tuple[bool, str]:
    """(available, reason) for --fused_mlp: Triton, and bf16 activations (the CPU plan keeps
    float32 ones)."""
    ok, why = triton_available(machine, "fused MLP")
    if ok and not Machine.of(machine).cuda:
        return False, "the fused MLP is for bf16 activations, which the CPU path does not use"
    return ok, why


# --- proofs: each fast path against its reference, inside a guard --------------------------

@dataclass(frozen=True)
class Proof:
    """One fast path's start-up check: its errors ((what, error, tolerance), ...) against its
    reference path, or the failure that ended it (an exception's first line)."""
    path: str
    errors: tuple = ()
    failure: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure and bool(self.errors) and all(e <= tol for _, e, tol in self.errors)  # NaN: False

    @property
    def worst(self) -> tuple:
        """(what, error, tolerance) with the largest error / tolerance (NaN first)."""
        return max(self.errors, key=lambda r: math.inf if r[1] != r[1] else r[1] / r[2])

    @property
    def why(self) -> str:
        if self.failure:
            return self.failure
        if not self.errors:
            return "no check ran"
        what, err, tol = self.worst
        return f"{what} error {err:.1e} {'<=' if err <= tol else '>'} tolerance {tol:.0e}"


def relative_error(got: Tensor, ref: Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 on the CPU (NaN if either has a NaN)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def prove(path: str, check: Callable[[], list], machine) -> Proof:
    """Runs check() (-> [(what, error, tolerance), ...]) inside the guard. Any exception
    becomes the Proof's failure. On a GPU a fault can leave the device unusable (a sticky
    CUDA error): then no fallback can run here and the run ends with a ConfigError."""
    try:
        return Proof(path, tuple(check()))
    except Exception as e:  # compile errors, OutOfResources, CUDA errors, missing symbols, wrong shapes
        proof = Proof(path, failure=_one_line(e))
    if Machine.of(machine).device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:
            raise ConfigError(f"the GPU is unusable after the check of {path} failed ({proof.failure}; then "
                              f"{_one_line(e)}): rerun with that path off") from None
    return proof


def _randn(*shape, seed: int, device, scale: float = 1.0, dtype=torch.bfloat16) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _fwd_bwd(fn, inputs, grad=None) -> list[Tensor]:
    """fn's output and the gradients of its inputs, for a fresh copy of the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) if grad is None else grad)
    return [out.detach()] + [t.grad for t in leaves]


def check_attention(fn, machine, num_heads: int, head_dim: int, compiled: bool = False) -> list:
    """A backend's output and q, k, v gradients against SDPA in float32, at a small packed
    shape: documents of 300, 1, 400 and 323 tokens, a window of 384. compiled: through
    torch.compile(fullgraph=True) as the model calls it (a hub build whose ops do not trace
    fails here, not at the warm-up)."""
    device, dtype = Machine.of(machine).device, torch.bfloat16 if Machine.of(machine).cuda else torch.float32
    T, window, scale = 1024, 384, head_dim ** -0.5
    cu = torch.tensor([0, 300, 301, 701, T] + [T] * 3, dtype=torch.int32, device=device)
    q, k, v, g = (_randn(T, num_heads, head_dim, seed=s, device=device, dtype=dtype) for s in range(4))
    got = _fwd_bwd(maybe_compile(lambda a, b, c: fn(a, b, c, cu, T, window, scale), compiled), (q, k, v), g)
    ref = _fwd_bwd(lambda a, b, c: attention_sdpa(a, b, c, cu, T, window, scale),
                   (q.float(), k.float(), v.float()), g.float())
    tol = PROOF_TOLERANCES["attention"]
    return [(what, relative_error(a, b), tol) for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref)]


def head_inputs(T: int, d: int, V: int, K: int, device) -> tuple:
    """x (T, d) normalized as the final hidden states, w (V, d) as a trained lm_head, targets
    and K multi-token weights: the loss head's check and timing inputs."""
    x = norm(_randn(T, d, seed=10, device=device, dtype=torch.float32)).bfloat16()
    w = _randn(V, d, seed=11, device=device, scale=0.05)
    targets = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(12)).to(device)
    weights = torch.tensor([1.0, 0.5, 0.25][:K], device=device)
    return x, w, targets, weights


def check_fp8_head(T: int, d: int, V: int, device, compiled: bool) -> list:
    """The FP8 lm_head (2c): its output and gradients against the bf16 linear it replaces."""
    x, w, _, _ = head_inputs(T, d, V, 1, device)
    g = _randn(T, V, seed=13, device=device, scale=1e-3)
    got = _fwd_bwd(lambda a, b: fp8_mm(a, b, FP8_X_SCALE, FP8_W_SCALE, FP8_GRAD_SCALE, compiled)[0], (x, w), g)
    ref = _fwd_bwd(lambda a, b: F.linear(a, b), (x, w), g)
    tol = PROOF_TOLERANCES["fp8 head"]
    return [(what, relative_error(a, b), tol) for what, a, b in zip(("out", "grad_x", "grad_w"), got, ref)]


def loss_head_forms(x, w, targets, weights, grad_scale: float, compiled: bool) -> dict:
    """The loss head's forms as functions of (x, w) -> the loss times grad_scale (what the
    trainer's backward starts from): each fused path, and the unfused FP8 head."""
    unfused_loss = maybe_compile(mtp_loss, compiled)
    forms = {path: (lambda a, b, p=path: fused_loss_head(a, b, targets, weights, grad_scale, p == "one pass",
                                                         compiled) * grad_scale) for path in FUSED_LOSS_PATHS}
    forms["unfused"] = lambda a, b: unfused_loss(fp8_mm(a, b, FP8_X_SCALE, FP8_W_SCALE, FP8_GRAD_SCALE, compiled)[0],
                                                 targets, weights) * grad_scale
    return forms


def check_loss_head(path: str, T: int, d: int, V: int, K: int, grad_scale: float, device, compiled: bool) -> list:
    """A fused loss head's loss, grad_x and grad_w against the unfused FP8 head's."""
    x, w, targets, weights = head_inputs(T, d, V, K, device)
    forms = loss_head_forms(x, w, targets, weights, grad_scale, compiled)
    ref = _fwd_bwd(forms["unfused"], (x, w))
    got = _fwd_bwd(forms[path], (x, w))
    tol, gtol = PROOF_TOLERANCES["loss"], PROOF_TOLERANCES["loss grads"]
    return [("loss", relative_error(got[0], ref[0]), tol), ("grad_x", relative_error(got[1], ref[1]), gtol),
            ("grad_w", relative_error(got[2], ref[2]), gtol)]


def mlp_inputs(T: int, d: int, device, dtype) -> tuple:
    return (_randn(T, d, seed=20, device=device, dtype=dtype),
            _randn(4 * d, d, seed=21, device=device, dtype=dtype, scale=d ** -0.5),
            _randn(4 * d, d, seed=22, device=device, dtype=dtype, scale=d ** -0.5))


def check_mlp(T: int, d: int, device, dtype) -> list:
    """The fused MLP's output and three gradients against the unfused MLP's."""
    inputs = mlp_inputs(T, d, device, dtype)
    g = _randn(T, d, seed=23, device=device, dtype=dtype)
    got, ref = _fwd_bwd(fused_mlp, inputs, g), _fwd_bwd(unfused_mlp, inputs, g)
    tol = PROOF_TOLERANCES["mlp"]
    return [(what, relative_error(a, b), tol)
            for what, a, b in zip(("out", "grad_x", "grad c_fc", "grad c_proj"), got, ref)]


def sym_inputs(d: int, per_rank: int, device, dtype) -> tuple:
    """Polar Express's operands as its kernels see them at NorMuon's shapes: per_rank MLP
    updates, transposed to (d, 4d), and per_rank attention updates as 4 (d, d) blocks each."""
    mlp = _randn(per_rank, d, 4 * d, seed=30, device=device, dtype=dtype, scale=(4 * d) ** -0.5)
    attn = _randn(4 * per_rank, d, d, seed=31, device=device, dtype=dtype, scale=d ** -0.5)
    return mlp, attn


def check_sym(d: int, per_rank: int, device, dtype) -> list:
    """The Triton symmetric matmuls against torch's: A = X X^T of both stacks, and
    b A + c A A (Polar Express's first coefficients) of the attention blocks' A."""
    tol = PROOF_TOLERANCES["sym"]
    rows = []
    for what, X in zip(("X X^T (MLP)", "X X^T (attention)"), sym_inputs(d, per_rank, device, dtype)):
        rows.append((what, relative_error(sym_xxt(X, use_triton=True), X @ X.mT), tol))
    A = X @ X.mT
    A = (A + A.mT) / 2  # exactly symmetric
    _, b, c = POLAR_EXPRESS_COEFFS[0]
    rows.append(("b A + c A A", relative_error(sym_ba_plus_caa(A, b, c, use_triton=True),
                                               torch.baddbmm(A, A, A, beta=b, alpha=c)), tol))
    return rows


def polar_express_step(d: int, per_rank: int, device, dtype, use_triton: bool):
    """One NorMuon step's Polar Express work on one rank (its MLP and attention updates):
    what the symmetric matmuls are timed by."""
    mlp, attn = sym_inputs(d, per_rank, device, dtype)
    u_mlp, u_attn = mlp.mT.contiguous(), attn.reshape(per_rank, 4 * d, d)
    return lambda: (orthogonalize_update(u_mlp, False, use_triton), orthogonalize_update(u_attn, True, use_triton))


def time_paths(fns: dict, sync, samples: int = PLAN_SAMPLES, iters: int = PLAN_ITERS) -> dict:
    """Median ms per call of each fn (samples taken in turn, so that drift hits all alike),
    after 2 untimed calls each. A fn that raises gets math.inf and its failure."""
    times, failed = {name: [] for name in fns}, {}
    for name, fn in fns.items():
        try:
            fn()
            fn()
        except Exception as e:
            failed[name] = _one_line(e)
    for _ in range(samples):
        for name, fn in fns.items():
            if name in failed:
                continue
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            times[name].append(1000 * (time.perf_counter() - t0) / iters)
    return {name: (math.inf, failed[name]) if name in failed else (sorted(ms)[len(ms) // 2], "")
            for name, ms in times.items()}


def timed_fwd_bwd(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def call():
        fn(*leaves).sum().backward()
        for t in leaves:
            t.grad = None
    return call


def run_shapes(args: Hyperparameters, machine, world_size: int) -> dict:
    """The shapes the proofs and timings use: the run's largest micro-batch (T tokens) and
    its multi-token predictions, the model's width, the padded vocabulary and NorMuon's
    matrices per rank. Under the Triton interpreter (CPU), small ones instead."""
    step = max(range(total_steps(args)), key=lambda s: batch_size_at(s, args))
    shapes = dict(T=batch_size_at(step, args) // VIRTUAL_RANKS, K=len(mtp_weights(step, args)), d=args.model_dim,
                  V=next_multiple_of_n(args.vocab_size, 128), per_rank=16 // world_size, heads=args.num_heads,
                  head_dim=args.head_dim, grad_scale=1 / (VIRTUAL_RANKS // world_size))
    if Machine.of(machine).interpret and not Machine.of(machine).cuda:
        shapes.update(T=48, d=32, V=640, K=3, per_rank=1)
    return shapes


# --- resolving the plan ---------------------------------------------------------------------

def start_process(machine: Machine, world_size: int, processes_here: int) -> None:
    """This process's share of the machine, before any plan: its CPU threads (a CPU run),
    its GPU, and the process group (NCCL between GPUs, gloo between CPU processes)."""
    gpu = machine.device.type == "cuda"
    if gpu:
        torch.cuda.set_device(machine.device)
    else:
        torch.set_num_threads(cpu_threads_per_process(processes_here))
    if world_size > 1:
        dist.init_process_group("nccl" if gpu else "gloo", device_id=machine.device if gpu else None)


def agreed(proof: Proof, rank: int, world_size: int) -> Proof:
    """The proof as every rank sees it: failed if it failed on any rank (one all_gather)."""
    if world_size == 1:
        return proof
    results = [None] * world_size
    dist.all_gather_object(results, (proof.ok, proof.why))
    bad = [(r, why) for r, (ok, why) in enumerate(results) if not ok]
    if proof.ok and bad:
        return dataclasses.replace(proof, failure=f"failed on rank {bad[0][0]}: {bad[0][1]}")
    return proof


def timed_on_rank0(fns: dict, plan: RunPlan, rank: int, world_size: int) -> dict:
    """time_paths on rank 0, the same figures on every rank (so every rank chooses alike)."""
    times = time_paths(fns, plan.sync) if rank == 0 else None
    if world_size > 1:
        box = [times]
        dist.broadcast_object_list(box, src=0)
        times = box[0]
    return times


def _proven(proof: Proof) -> str:
    what, err, tol = proof.worst
    return f"proven ({what} error {err:.1e} <= {tol:.0e})"


def _faster(choice: str, times: dict, reference: str) -> tuple[bool, str]:
    """Whether `choice` beats the reference by PLAN_MARGIN, and the figures."""
    shown = ", ".join(f"{name} {ms:.3f} ms" if ms < math.inf else f"{name} failed ({why})"
                      for name, (ms, why) in times.items())
    fast, ref = times[choice][0], times[reference][0]
    gain = 1 - fast / ref if ref < math.inf and fast < math.inf else -math.inf
    verdict = "not timed" if gain == -math.inf else f"{100 * gain:.0f}% faster" if gain >= 0 else \
        f"{-100 * gain:.0f}% slower"
    return gain >= PLAN_MARGIN, f"{shown} (median of {PLAN_SAMPLES}): {verdict}, needs {PLAN_MARGIN:.0%}"


class _PlanBuilder:
    """resolve_plan's state: the plan so far, its table rows, this rank and its peers."""

    def __init__(self, args, machine: Machine, rank: int, world_size: int):
        self.args, self.m, self.rank, self.world_size = args, machine, rank, world_size
        self.plan = base_plan(args, machine, world_size)
        self.rows = list(self.plan.rows)
        self.shapes = run_shapes(args, machine, world_size)
        self.proofs, self.timings = [], []

    def prove(self, path: str, check) -> Proof:
        proof = agreed(prove(path, check, self.m), self.rank, self.world_size)
        self.proofs.append(proof)
        return proof

    def time(self, choice: str, fns: dict) -> dict:
        times = timed_on_rank0(fns, self.plan, self.rank, self.world_size)
        self.timings.append((choice, times))
        return times

    def forced_failure(self, flag: str, proofs: list[Proof]) -> ConfigError:
        return ConfigError(f"--{flag}=on: its start-up check failed: "
                           + "; ".join(f"{p.path}: {p.why}" for p in proofs))

    def attention(self) -> None:
        requested, m = self.args.attn_backend, self.m
        s = self.shapes
        if requested != "auto":
            fn, what = forced_attention_backend(requested, m)
            if requested != "sdpa":
                proof = self.prove(f"attention {requested}", lambda: check_attention(fn, m, s["heads"], s["head_dim"],
                                                                                     self.plan.compile))
                if not proof.ok:
                    raise ConfigError(f"--attn_backend={requested}: its start-up check against SDPA failed: {proof.why}")
                why = f"forced; {_proven(proof)}"
            else:
                why = "forced (the reference)"
            self._take_attention(requested, fn, f"{requested}{what}", why)
            return
        skipped = []
        for name in ATTENTION_BACKENDS[:-1] if m.cuda else ():
            fn, why, what = _try_backend(name, m)
            if fn is None:
                skipped.append(f"{name}: {why}")
                continue
            proof = self.prove(f"attention {name}", lambda fn=fn: check_attention(fn, m, s["heads"], s["head_dim"],
                                                                                  self.plan.compile))
            if proof.ok:
                note = f"; skipped {'; '.join(skipped)}" if skipped else ""
                self._take_attention(name, fn, f"{name}{what}", f"auto: {_proven(proof)}{note}")
                return
            skipped.append(f"{name}: dropped: {proof.why}")
        why = "auto: " + ("; ".join(skipped) if skipped else f"the reference on {m.device.type}")
        self._take_attention("sdpa", attention_sdpa, "sdpa", why)

    def _take_attention(self, name, fn, shown, why):
        self.plan = dataclasses.replace(self.plan, attn_backend=name, attn_fn=fn)
        self.rows.append(("attention", shown, why))

    def fp8(self) -> None:
        setting, s = self.args.fp8, self.shapes
        ok, why = fp8_setting(setting, self.m)
        if not ok:
            self.rows.append(("FP8 lm_head", "off", why or f"--fp8={setting}"))
            return
        proof = self.prove("FP8 lm_head", lambda: check_fp8_head(min(s["T"], 8192), s["d"], s["V"], self.m.device,
                                                                  self.plan.compile))
        if not proof.ok:
            if setting == "on":
                raise self.forced_failure("fp8", [proof])
            self.rows.append(("FP8 lm_head", "off", f"auto: dropped: {proof.why}; a bf16 linear"))
            return
        self.plan = dataclasses.replace(self.plan, fp8=True)
        self.rows.append(("FP8 lm_head", "on", f"--fp8={setting}; {_proven(proof)}"))

    def _fused(self, flag: str, choice: str, available: tuple) -> bool:
        """Whether the fused path `flag` is to be proven; else its row says why not."""
        setting, (ok, why) = getattr(self.args, flag), available
        if setting == "off":
            self.rows.append((choice, "off", f"--{flag}=off"))
            return False
        if not ok:
            if setting == "on":
                raise ConfigError(f"--{flag}=on: {why}")
            self.rows.append((choice, "off", why))
            return False
        if setting == "auto" and not self.m.cuda:
            self.rows.append((choice, "off", f"auto: the reference on {self.m.device.type} "
                                             f"(tools/selfcheck.py proves the kernels under TRITON_INTERPRET=1)"))
            return False
        return True

    def fused_loss(self) -> None:
        available = fused_loss_available(self.args, self.m)
        if available[0] and not self.plan.fp8:
            available = (False, "the fused loss head is the FP8 head's, and the FP8 head is off")
        if not self._fused("fused_loss", "fused loss head", available):
            return
        s, compiled = self.shapes, self.plan.compile
        proofs = [self.prove(f"fused loss head, {path}", lambda p=path: check_loss_head(
            p, s["T"], s["d"], s["V"], s["K"], s["grad_scale"], self.m.device, compiled)) for path in FUSED_LOSS_PATHS]
        passed = [path for path, proof in zip(FUSED_LOSS_PATHS, proofs) if proof.ok]
        dropped = "".join(f"; {p.path.split(', ')[1]} dropped: {p.why}" for p in proofs if not p.ok)
        if not passed:
            if self.args.fused_loss == "on":
                raise self.forced_failure("fused_loss", proofs)
            self.rows.append(("fused loss head", "off", f"auto: every fused form dropped{dropped}"))
            return
        if self.args.fused_loss == "on":
            choice, why = passed[0], f"forced; {_proven(proofs[FUSED_LOSS_PATHS.index(passed[0])])}{dropped}"
        else:
            x, w, targets, weights = head_inputs(s["T"], s["d"], s["V"], s["K"], self.m.device)
            forms = loss_head_forms(x, w, targets, weights, s["grad_scale"], compiled)
            times = self.time("fused loss head", {name: timed_fwd_bwd(forms[name], (x, w))
                                                  for name in passed + ["unfused"]})
            del x, w, forms
            best = min(passed, key=lambda name: times[name][0])
            faster, shown = _faster(best, times, "unfused")
            choice = best if faster else None
            why = f"auto: {_proven(proofs[FUSED_LOSS_PATHS.index(best)])}; {shown}{dropped}"
        self.plan = dataclasses.replace(self.plan, fused_loss=choice)
        self.rows.append(("fused loss head", choice or "off", why))

    def fused_mlp(self) -> None:
        if not self._fused("fused_mlp", "fused MLP", fused_mlp_available(self.args, self.m)):
            return
        s, act = self.shapes, self.plan.act_dtype
        proof = self.prove("fused MLP", lambda: check_mlp(s["T"], s["d"], self.m.device, act))
        if not proof.ok:
            if self.args.fused_mlp == "on":
                raise self.forced_failure("fused_mlp", [proof])
            self.rows.append(("fused MLP", "off", f"auto: dropped: {proof.why}"))
            return
        if self.args.fused_mlp == "on":
            on, why = True, f"forced; {_proven(proof)}"
        else:
            inputs = mlp_inputs(s["T"], s["d"], self.m.device, act)
            times = self.time("fused MLP", {"fused": timed_fwd_bwd(fused_mlp, inputs),
                                            "unfused": timed_fwd_bwd(maybe_compile(unfused_mlp, self.plan.compile),
                                                                      inputs)})
            on, shown = _faster("fused", times, "unfused")
            why = f"auto: {_proven(proof)}; {shown}"
        self.plan = dataclasses.replace(self.plan, fused_mlp=on)
        self.rows.append(("fused MLP", "on" if on else "off", why))

    def sym_matmuls(self) -> None:
        ok, why = triton_available(self.m, "Triton Polar Express")
        if not ok or not self.m.cuda:
            self.rows.append(("symmetric matmuls", "torch", why or f"the reference on {self.m.device.type}"))
            return
        s, dtype = self.shapes, self.plan.ortho_dtype
        proof = self.prove("symmetric matmuls", lambda: check_sym(s["d"], s["per_rank"], self.m.device, dtype))
        if not proof.ok:
            self.rows.append(("symmetric matmuls", "torch", f"auto: triton dropped: {proof.why}"))
            return
        times = self.time("symmetric matmuls", {use: polar_express_step(s["d"], s["per_rank"], self.m.device, dtype,
                                                                        use == "triton") for use in ("triton", "torch")})
        on, shown = _faster("triton", times, "torch")
        self.plan = dataclasses.replace(self.plan, sym_triton=on)
        self.rows.append(("symmetric matmuls", "triton" if on else "torch", f"auto: {_proven(proof)}; {shown}"))


def resolve_plan(args: Hyperparameters, device, rank: int = 0, world_size: int = 1, log=None, *,
                 machine: Machine | None = None, training: bool = True) -> RunPlan:
    """The run's plan on this machine: base_plan's choices, then every fast path proven (and
    timed) as the section's comment says; the same plan on every rank. `log` gets the table.
    training=False (evaluation, sampling): only the attention backend is chosen."""
    b = _PlanBuilder(args, machine or Machine.of(device), rank, world_size)
    steps = (b.attention, b.fp8, b.fused_loss, b.fused_mlp, b.sym_matmuls) if training else (b.attention,)
    try:
        for step in steps:
            step()
        if b.m.device.type == "cuda":  # the checks' memory is not the run's: free it, reset the peak
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(b.m.device)
    finally:  # the table so far, also when a forced path fails (its error follows)
        plan = dataclasses.replace(b.plan, rows=tuple(b.rows), proofs=tuple(b.proofs), timings=tuple(b.timings))
        if log is not None:
            log(f"start-up plan (rank {rank} of {world_size}; a fast path is taken only if proven on every rank):")
            log(plan.table())
    return plan


def assumed_gpu_plan(args: Hyperparameters, world_size: int, attn_fn: Callable,
                     machine: Machine | None = None) -> RunPlan:
    """The plan a CUDA rank builds when every fast path that --attn_backend, --fp8,
    --fused_loss and --fused_mlp allow is proven and faster (the fused head in one pass), on
    `machine` (default an sm90 `meta` device): what tools/preflight.py traces, without
    running a kernel. attn_fn stands in for the backend."""
    m = machine or Machine.record_gpu()
    a = args
    plan = base_plan(a, m, world_size)
    fp8 = a.fp8 != "off"
    name = "fa3" if a.attn_backend == "auto" else a.attn_backend
    rows = plan.rows + (("attention", name, "assumed proven"), ("FP8 lm_head", "on" if fp8 else "off", "assumed"),
                        ("fused loss head", "one pass" if fp8 and a.fused_loss != "off" else "off", "assumed"),
                        ("fused MLP", "off" if a.fused_mlp == "off" else "on", "assumed"),
                        ("symmetric matmuls", "triton", "assumed"))
    return dataclasses.replace(plan, attn_backend=name, attn_fn=attn_fn, fp8=fp8,
                               fused_loss=FUSED_LOSS_PATHS[0] if fp8 and a.fused_loss != "off" else None,
                               fused_mlp=a.fused_mlp != "off", sym_triton=True, rows=rows)


# =====================================================================================
# 3. Optimizers
# =====================================================================================

# Every parameter carries a `label` attribute set by the model; it routes the parameter to
# NorMuon (the (4d, d) matrices) or to Adam (everything else) and picks its hyperparameters.

# Polar Express (ALGORITHM.md 3.3): (a, b, c) per iteration.
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


def add_scaled_(C: Tensor, X: Tensor, alpha: float) -> Tensor:
    """C += alpha * X in place as ONE rounding: the record's `C.add_(X, alpha=a)` on CUDA,
    which computes C + alpha*X in fp32 (alpha an fp32 scalar) and rounds to C's dtype once.
    PyTorch's CPU kernel for bf16 rounds alpha to bf16 (and, for a strided X, alpha*X too),
    so on CPU the same fp32 arithmetic is written out."""
    if C.device.type != "cpu" or C.dtype not in (torch.bfloat16, torch.float16):
        return C.add_(X, alpha=alpha)
    return C.copy_(C.float() + torch.tensor(alpha, dtype=torch.float32) * X.float())


def polar_express(G: Tensor, split: bool = False, use_triton: bool = False) -> Tensor:
    """Approximate polar factor U V^T of G (2-D, or batched over a leading dim), ALGORITHM.md 3.3.

    Works in G's dtype (the caller casts: bf16 as in the record; NorMuon's ortho_dtype may
    pick fp32 on CPU, where bf16 matmuls are slow). Record arithmetic: a tall G is transposed
    first; the Frobenius norm, its scaling and the division are tensor ops in G's dtype (a
    bf16 scalar for bf16). split: `X = a X + B X` as `C = B @ X; C.add_(X, alpha=a)` (the
    record's MLP matrices: one op, C + a*X rounded once) instead of one fused baddbmm (its
    attention blocks). `C += a * X` would round a*X first and move the MLP updates ~2%.
    use_triton: A = X X^T and B = b A + c A A by the Triton kernels of 2a (RunPlan.sym_triton).
    """
    X = G if G.ndim == 3 else G.unsqueeze(0)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    X = X.contiguous()
    batch, m, _ = X.shape
    A = X.new_empty(batch, m, m)
    B = X.new_empty(batch, m, m)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        sym_xxt(X, out=A, use_triton=use_triton)
        sym_ba_plus_caa(A, b, c, out=B, use_triton=use_triton)
        if split:
            X = add_scaled_(torch.bmm(B, X), X, a)
        else:
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


# torch 2.13 deprecates reduce_scatter_tensor and all_gather_into_tensor (FutureWarning at
# every call) in favour of *_single names that torch 2.11, which GPU images still carry,
# does not have: the old names are called with that one warning silenced, here only.
def reduce_scatter(output: Tensor, input: Tensor, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*deprecated", category=FutureWarning)
        return dist.reduce_scatter_tensor(output, input, **kwargs)


def all_gather(output: Tensor, input: Tensor, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
        return dist.all_gather_into_tensor(output, input, **kwargs)


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


def orthogonalize_update(u: Tensor, attn: bool, use_triton: bool = False) -> Tensor:
    """Polar Express of a stack of updates (n, rows, cols); attention qkvo updates as four
    separate (rows/4, cols) blocks of rows (Q, K, V, O), MLP matrices with the split update."""
    if not attn:
        return polar_express(u, split=True, use_triton=use_triton)
    n, rows, cols = u.shape
    return polar_express(u.reshape(n * 4, rows // 4, cols), use_triton=use_triton).reshape(n, rows, cols)


def normuon_scale_(o: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon variance normalization (ALGORITHM.md 3.4), in place on o and second_moment.

    o: (n, units, r, c) orthogonalized updates, one unit per independently normalized block
    (attention: Q, K, V, O; MLP: the whole matrix); second_moment: (n, units, r, 1) per row,
    or (n, units, 1, c) per column when the unit is wider than tall, fp32. Statistics in fp32
    from o; the final per-row scale is cast to o's dtype and applied in o's dtype. Each unit
    keeps its Frobenius norm. Returns o.
    """
    dim = -1 if second_moment.size(-1) == 1 else -2
    n_red = o.size(dim)
    v = o.float().square().mean(dim=dim, keepdim=True)
    v_norm = (v.sum(dim=(-2, -1), keepdim=True) * n_red).sqrt()
    second_moment.lerp_(v, 1 - beta2)
    r = second_moment.clamp_min(1e-10).rsqrt()
    # clamp: an all-zero unit (e.g. c_fc's first update while c_proj is still zero) stays zero
    v_norm_new = ((v * n_red) * r.square()).sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-10)
    return o.mul_((r * (v_norm / v_norm_new)).to(o.dtype))


def cautious_update_(master: Tensor, u: Tensor, lr_p: Tensor, wd_factor: Tensor) -> Tensor:
    """ALGORITHM.md 3.5-3.6 in fp32, in place on master: `p - p * mask * wd_factor * lr_p - u * lr_p`,
    mask = [u * p >= 0], u the normalized update as fp32. lr_p: per matrix, wd_factor =
    weight_decay * lr; both fp32, each rounded once from the float64 product."""
    u = u.float()
    mask = (u * master) >= 0
    return master.copy_(master - master * mask * wd_factor * lr_p - u * lr_p)


def normuon_apply_(o: Tensor, second_moment: Tensor, p: Tensor, mantissa: Tensor | None, shape_f: Tensor,
                   lr_mul: Tensor, lr: Tensor, wd_factor: Tensor, beta2: float) -> Tensor:
    """NorMuon's elementwise work after Polar Express, one function so that it compiles into
    a few fused kernels (ALGORITHM.md 3.4-3.6): variance normalization (in place on second_moment),
    cautious decay and update on the fp32 master weight rebuilt from p and mantissa, split
    back into p (a fresh stack of the parameters) and mantissa. Returns the new values.

    o: (n, units, r, c); p: (n, rows, cols); shape_f, lr_mul: (n, 1, 1) float64 constants
    (max(1, rows/cols)^0.5 and the label's lr multiplier); lr: 0-d float64 CPU tensor, the
    scheduled lr; wd_factor: 0-d fp32 CPU tensor, weight_decay * lr rounded once from Python
    floats (tensors: a new value is no new graph). lr_p = lr * shape_f * lr_mul is a float64
    product rounded once to fp32, as with Python floats.
    """
    u = normuon_scale_(o, second_moment, beta2).view(p.shape)
    lr_p = ((lr * shape_f) * lr_mul).float()
    master = fp32_from_bf16_and_mantissa(p, mantissa) if mantissa is not None else p.float()
    cautious_update_(master, u, lr_p, wd_factor)
    if mantissa is None:
        return master.to(p.dtype)
    split_fp32_to_bf16_and_mantissa(master, p, mantissa)
    return p


def adam_update(p: Tensor, grad: Tensor, m: Tensor, v: Tensor, b1: float, b2: float, eps: float,
                step_size: Tensor, decay: Tensor | None) -> Tensor:
    """One Adam update (ALGORITHM.md 3.8) in the record's arithmetic, m and v in place (fp32):
    m.mul_(b1).add_(g, alpha=1-b1), v.mul_(b2).addcmul_(g, g, value=1-b2),
    upd = m / (sqrt(v) + eps) * step_size, then cautious decay upd += decay * p * [upd * p > 0]
    (decay None: no weight decay). step_size and decay: 0-d fp32 CPU tensors made from Python
    floats (so the schedule never makes a new graph). Returns p - upd in p's dtype."""
    g = grad.float()
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    upd = m / (v.sqrt() + eps) * step_size
    p32 = p.float()
    if decay is not None:
        upd = upd + decay * p32 * ((upd * p32) > 0)
    return (p32 - upd).to(p.dtype)


def maybe_compile(fn, enabled: bool):
    """fn, or torch.compile(fn, fullgraph=True) with static shapes when enabled."""
    return torch.compile(fn, dynamic=False, fullgraph=True) if enabled else fn


class GradSums:
    """Each parameter's gradient summed over this rank's micro-batches, as the optimizers read it.

    dtype None: the sum is autograd's own p.grad. Otherwise every parameter of another dtype
    gets a buffer of that dtype: a post-accumulate-grad hook adds each micro-batch's gradient
    into it and frees p.grad; the optimizers' collectives then also run in that dtype.
    Why: a bf16 running sum rounds after every micro-batch, so it depends on how the 8
    micro-batches are split among processes, and Polar Express turns last-bit noise in small
    singular directions into full-size update directions (early in training a perturbation
    grows about 10x per step). fp32 sums shrink that noise. float64 sums of up to 16 bf16
    (fp32) gradients are exact unless their magnitudes spread over more than about 2^41
    (2^25), so every split, i.e. any world size, gives the same bits.
    The gradient path is one protocol, owned here: each parameter has one post-accumulate-
    grad hook, this object's. It adds the micro-batch's gradient into the sum and then, in
    the step's final micro-batch (`with micro_batch(final=True)`), hands the finished sum to
    the parameter's listener (when_final: DistAdam starts its collective there). So a
    listener always reads a finished sum, whatever order hooks were registered in.
    cast_first (the CPU plan): each gradient is cast into a scratch buffer before the add, as
    a mixed-dtype add_ is not vectorized there (~4x slower); the sum is the same.
    """

    def __init__(self, params: list[Tensor], dtype: torch.dtype | None = None, cast_first: bool = False):
        self.dtype = dtype
        self.buffers: dict[Tensor, Tensor] = {}
        self.filled: dict[Tensor, bool] = {}
        self.listeners: dict[Tensor, Callable] = {}
        self.final = False
        self._hooked: set[Tensor] = set()
        self.scratch = None
        if dtype is None:
            return
        for p in params:
            if p.dtype != dtype:
                self.buffers[p] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                self.filled[p] = False
                self._hook(p)
        sizes = [b.numel() for b in self.buffers.values()]
        self.scratch = torch.empty(max(sizes), dtype=dtype) if cast_first and sizes else None

    def _hook(self, p: Tensor) -> None:
        if p not in self._hooked:
            p.register_post_accumulate_grad_hook(self._on_grad)
            self._hooked.add(p)

    def _on_grad(self, p: Tensor) -> None:
        if p in self.buffers:
            self._add(p)
        if self.final and p in self.listeners:
            self.listeners[p](p)

    def when_final(self, p: Tensor, listener: Callable) -> None:
        """listener(p) gets p's finished sum in the step's final micro-batch (see micro_batch)."""
        self.listeners[p] = listener
        self._hook(p)

    @contextlib.contextmanager
    def micro_batch(self, final: bool):
        """One micro-batch's backward; final: the last before the optimizers read the sums,
        where each listener is handed its finished sum as autograd produces it."""
        self.final = final
        try:
            yield
        finally:
            self.final = False

    def _add(self, p: Tensor) -> None:
        buf = self.buffers[p]
        if self.filled[p]:
            grad = p.grad
            if self.scratch is not None:
                grad = self.scratch[:grad.numel()].view(grad.shape).copy_(grad)
            buf.add_(grad)
        else:
            buf.copy_(p.grad)
            self.filled[p] = True
        p.grad = None

    def get(self, p: Tensor) -> Tensor | None:
        """The summed gradient of p (None if it has none); a manually set p.grad also counts."""
        return self.buffers[p] if self.filled.get(p) else p.grad

    def clear(self, p: Tensor) -> None:
        p.grad = None
        if p in self.filled:
            self.filled[p] = False

    def set(self, p: Tensor, g: Tensor) -> None:
        """Makes g the summed gradient of p (a checkpoint's pending gradient)."""
        if p in self.buffers:
            self.buffers[p].copy_(g)
            self.filled[p] = True
        else:
            p.grad = g.to(device=p.device, dtype=p.dtype)


@dataclass
class _MuonGroup:
    members: list  # matrix indices, None = zero pad
    per_rank: int
    mine: list  # this rank's real matrices (they lead its chunk; pads come last)
    attn: bool  # this rank's matrices are attention qkvo (orthogonalized as 4 blocks)
    momentum: Tensor  # (n, rows, cols) fp32
    # (n, units, rows/units, 1) per row of each unit, or (n, units, 1, cols) when the unit is
    # wider than tall; fp32. units: 4 for attention (Q, K, V, O normalized apart), else 1
    second_moment: Tensor
    mantissa: Tensor | None  # (n, rows, cols) uint16 low bits of the fp32 master (bf16 params)
    shape_f: Tensor  # (n, 1, 1) float64: max(1, rows/cols)^0.5 per matrix
    lr_mul: Tensor  # (n, 1, 1) float64: the label's lr multiplier per matrix


class NorMuon:
    """NorMuon (ALGORITHM.md 3.1-3.7) for equally-shaped 2-D matrices, each rank updating its chunk.
    The (scheduled) lr and momentum are given to each step.

    ortho_dtype: dtype of the Polar Express work (RunPlan.ortho_dtype: bf16 on a GPU as in the
    record, fp32 on the CPU); sym_triton: its symmetric matmuls by the Triton kernels (2a).
    compile: run the elementwise work after Polar Express (normuon_apply_) compiled.
    """

    def __init__(self, params: list[Tensor], labels: list[str], weight_decay: float, beta2: float,
                 rank: int = 0, world_size: int = 1, packed: bool | None = None,
                 ortho_dtype: torch.dtype = torch.float32, grads: GradSums | None = None,
                 compile: bool = False, sym_triton: bool = False):
        self.params, self.labels = list(params), list(labels)
        self._apply = maybe_compile(normuon_apply_, compile)
        self.grads = grads or GradSums([])
        self.weight_decay, self.beta2 = weight_decay, beta2
        self.ortho_dtype, self.sym_triton = ortho_dtype, sym_triton
        self.rank, self.world_size = rank, world_size
        self.groups: list[_MuonGroup] = []
        if not self.params:
            return
        device = self.params[0].device
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
            n, units = len(mine), 4 if attn else 1
            unit_rows = rows // units
            f32 = dict(dtype=torch.float32, device=device)
            self.groups.append(_MuonGroup(
                members=members, per_rank=k, mine=mine, attn=attn,
                momentum=torch.zeros(n, rows, cols, **f32),
                second_moment=torch.zeros((n, units, unit_rows, 1) if unit_rows >= cols else (n, units, 1, cols),
                                          **f32),
                mantissa=(torch.zeros(n, rows, cols, dtype=torch.uint16, device=device)
                          if real[0].dtype == torch.bfloat16 else None),
                shape_f=torch.full((n, 1, 1), max(1.0, rows / cols) ** 0.5, dtype=torch.float64, device=device),
                lr_mul=torch.tensor([MUON_LR_MUL[self.labels[i]] for i in mine], dtype=torch.float64,
                                    device=device).view(n, 1, 1),
            ))

    def _stacked_grads(self, g: _MuonGroup) -> Tensor:
        grads = [None if i is None else self.grads.get(self.params[i]) for i in g.members]
        if any(grad is None for grad in grads):  # pads, or matrices without a gradient
            # zeros like the real gradients (their dtype); with none, like the group's first matrix
            like = next((grad for grad in grads if grad is not None), self.params[g.members[0]])
            zero = torch.zeros_like(like)
            grads = [zero if grad is None else grad for grad in grads]
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
                work = reduce_scatter(chunk, stacked, op=dist.ReduceOp.AVG, async_op=True)
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
            gathers.append((all_gather(out, send, async_op=True), g, out, send))
        for work, g, out, _ in gathers:
            work.wait()
            slots = [j for j, i in enumerate(g.members) if i is not None]
            torch._foreach_copy_([self.params[g.members[j]] for j in slots], [out[j] for j in slots])
        for p in self.params:
            self.grads.clear(p)

    @torch.no_grad()
    def step(self, lr: float, momentum: float) -> None:
        self.finish(self.launch_reduce(), lr, momentum)

    def _update(self, g: _MuonGroup, grad: Tensor, lr: float, mu: float) -> Tensor:
        """New values (n, rows, cols), in the parameters' dtype, of this rank's matrices."""
        n, rows, cols = grad.shape
        u = grad.float()  # a fresh copy for bf16 grads; for fp32 the (private) stack or chunk itself
        g.momentum.lerp_(u, 1 - mu)
        u.lerp_(g.momentum, mu)  # Nesterov: u = lerp(g, m, mu)
        o = orthogonalize_update(u.to(self.ortho_dtype), g.attn, self.sym_triton)
        units = g.second_moment.size(1)
        p = torch.stack([self.params[i] for i in g.mine])
        return self._apply(o.view(n, units, rows // units, cols), g.second_moment, p, g.mantissa, g.shape_f,
                           g.lr_mul, torch.tensor(lr, dtype=torch.float64),
                           torch.tensor(self.weight_decay * lr, dtype=torch.float32), self.beta2)

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
    """Adam with bias correction and cautious decay (ALGORITHM.md 3.8), per-label hyperparameters.

    With world_size > 1, gradients are averaged by collectives that GradSums starts as each
    finished sum arrives in a step's final micro-batch (Optimizers.micro_batch; else at step
    time): tensors of < 1024 elements or whose dim 0 is not
    divisible by world_size are all-reduced and updated in full on every rank; larger ones are
    reduce-scattered along dim 0, updated shard-wise (sharded state) and all-gathered.
    """

    def __init__(self, params: list[Tensor], labels: list[str], eps: float, weight_decay: float,
                 rank: int = 0, world_size: int = 1, grads: GradSums | None = None, compile: bool = False):
        self.eps, self.weight_decay = eps, weight_decay
        self._update_fn = maybe_compile(adam_update, compile)
        self.grads = grads or GradSums([])
        self.rank, self.world_size = rank, world_size
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
                self.grads.when_final(p, lambda _p, slot=slot: self._launch_sync(slot))

    def _launch_sync(self, slot: _AdamSlot) -> None:
        if slot.pending is not None:
            raise RuntimeError(f"Adam gradient of a '{slot.label}' parameter was synchronized twice "
                               "in one step: only the last micro-batch of an Adam step is final")
        grad = self.grads.get(slot.param)
        if slot.sharded:
            shard = grad.new_empty(slot.m.shape)
            work = reduce_scatter(shard, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
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
        if self.world_size > 1:  # gradients whose sync was not started in the final micro-batch
            for slot in self.slots:
                if slot.pending is None and self.grads.get(slot.param) is not None:
                    self._launch_sync(slot)
            ready = self._launched
        else:
            ready = [slot for slot in self.slots if self.grads.get(slot.param) is not None]
        gathers = []
        for slot in ready:
            if slot.pending is not None:
                work, grad = slot.pending
                work.wait()
                slot.pending = None
            else:
                grad = self.grads.get(slot.param)
            new = self._update(slot, grad, lr)
            if slot.sharded:
                gathers.append(all_gather(slot.param.detach(), new, async_op=True))
            else:
                slot.param.copy_(new)
        self._launched = []
        for slot in self.slots:
            self.grads.clear(slot.param)
        return gathers

    def _update(self, slot: _AdamSlot, grad: Tensor, lr: float) -> Tensor:
        b1, b2 = slot.betas
        slot.step += 1
        lr_p = lr * slot.lr_mul
        # Python floats, each rounded once to an fp32 scalar (0-d CPU tensors: no new graph per value)
        step_size = torch.tensor(lr_p * (1 - b2 ** slot.step) ** 0.5 / (1 - b1 ** slot.step), dtype=torch.float32)
        decay = (torch.tensor(lr_p * lr_p * self.weight_decay * slot.wd_mul, dtype=torch.float32)
                 if slot.wd_mul else None)
        return self._update_fn(self._local(slot), grad, slot.m, slot.v, b1, b2, self.eps, step_size, decay)

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

    Per step: run each micro-batch's backward inside `with micro_batch(last=..., adam_step=...)`,
    then step(lr_multiplier, momentum, adam_step). The micro-batches' gradients are summed (NOT
    averaged over ranks: step() does that) in p.grad or in buffers of args.grad_sum_dtype
    (see grad_sum_dtype and GradSums).
    """

    def __init__(self, model: nn.Module, args: Hyperparameters, rank: int, world_size: int,
                 *, muon_packed: bool | None = None, plan: RunPlan | None = None):
        """plan: the run's machine choices (gradient-sum dtype, Polar Express dtype and kernels,
        compile); default the reference plan of the parameters' device (base_plan)."""
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
        params = muon[0] + adam[0]
        plan = plan or base_plan(args, Machine.of(params[0].device), world_size)
        self.grads = GradSums(params, plan.grad_sum_dtype, cast_first=plan.cpu)  # its hooks must run before DistAdam's
        self.muon = NorMuon(*muon, weight_decay=args.muon_weight_decay, beta2=args.muon_beta2,
                            rank=rank, world_size=world_size, packed=muon_packed, grads=self.grads,
                            compile=plan.compile, ortho_dtype=plan.ortho_dtype, sym_triton=plan.sym_triton)
        self.adam = DistAdam(*adam, eps=args.adam_eps, weight_decay=args.adam_weight_decay,
                             rank=rank, world_size=world_size, grads=self.grads, compile=plan.compile)

    @property
    def params(self) -> list[Tensor]:
        """Every optimized parameter: NorMuon's, then Adam's (the index order of pending_grads)."""
        return self.muon.params + [s.param for s in self.adam.slots]

    def micro_batch(self, last: bool, adam_step: bool):
        """The context of one micro-batch's backward. In the last micro-batch of an Adam
        (odd) step with several processes, each Adam gradient's collective starts as soon as
        its sum is finished, overlapping the rest of the backward (GradSums.micro_batch)."""
        return self.grads.micro_batch(final=last and adam_step and self.world_size > 1)

    @torch.no_grad()
    def step(self, lr_multiplier: float, momentum: float, adam_step: bool) -> None:
        """NorMuon every step, Adam only when adam_step; Muon's reduce-scatters are in flight
        while Adam updates. Muon grads are dropped every step, Adam grads after an Adam update."""
        pending = self.muon.launch_reduce()
        gathers = self.adam.step(self.args.adam_lr * lr_multiplier) if adam_step else []
        self.muon.finish(pending, self.args.muon_lr * lr_multiplier, momentum)
        for work in gathers:
            work.wait()

    @torch.no_grad()
    def split_embed(self) -> None:
        """Untie: embed gets lm_head's weight and its Adam state (m, v, step; the local shard)."""
        src, dst = self.adam.slot("lm_head"), self.adam.slot("embed")
        dst.param.copy_(src.param)
        dst.m.copy_(src.m)
        dst.v.copy_(src.v)
        dst.step = src.step

    def pending_grads(self) -> dict:
        """Gradient sums waiting for the next step (after an even step: Adam's), by parameter
        index (NorMuon's, then Adam's), as copies; for a checkpoint."""
        return {i: self.grads.get(p).detach().clone() for i, p in enumerate(self.params)
                if self.grads.get(p) is not None}

    def set_pending_grads(self, grads: dict) -> None:
        """Puts pending_grads() back (after load_state_dict, which drops all gradients)."""
        for i, g in grads.items():
            self.grads.set(self.params[i], g)

    def state_dict(self) -> dict:
        """Copies of all optimizer state (gradients are not part of it)."""
        return {"muon": self.muon.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict() bit for bit; also drops all gradients (e.g. the Adam gradients an
        even step leaves for the next step), as a restored state has none pending."""
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])
        for p in self.params:
            self.grads.clear(p)


# =====================================================================================
# 4. Schedules
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


def schedule_tokens(args: Hyperparameters) -> list[int]:
    """Global tokens trained before each step: entry k is the sum of the batch sizes of
    steps 0 .. k-1, for k = 0 .. total_steps (the ETA weighs the steps left by these)."""
    tokens = [0]
    for step in range(total_steps(args)):
        tokens.append(tokens[-1] + batch_size_at(step, args))
    return tokens


def eta_seconds(tokens_before: list[int], done: int, elapsed_ms: float) -> float:
    """Seconds left after `done` steps that took elapsed_ms: the time per token so far times
    the tokens of the steps left (their batches grow by stage)."""
    return elapsed_ms * (tokens_before[-1] - tokens_before[done]) / tokens_before[done] / 1000


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
# 5. Model
# =====================================================================================

class Layer(NamedTuple):
    attention: str  # "paired": paired-head attention, "plain": one head per position, "": none
    window: str  # "long" (with the partial key offset) or "short"; "" without attention
    value_embed: int | None  # which value embedding its attention adds to v
    skip: str  # U-net skip: "from" saves its output, "to" adds it before this layer
    backout: bool  # its output is subtracted after the last layer


# The layer layout of the record (ALGORITHM.md 2.2, 2.4 and "Attention"), one row per layer.
LAYERS = (
    #     attention  window   value_embed  skip    backout
    Layer("paired", "short", 1, "", False),  # 0
    Layer("plain", "short", 2, "", False),  # 1
    Layer("paired", "short", None, "", False),  # 2
    Layer("plain", "long", None, "from", False),  # 3
    Layer("plain", "short", None, "", False),  # 4
    Layer("paired", "short", None, "", False),  # 5
    Layer("", "", None, "to", False),  # 6
    Layer("plain", "short", None, "", True),  # 7
    Layer("plain", "short", 0, "", False),  # 8
    Layer("paired", "short", 1, "", False),  # 9
    Layer("plain", "long", 2, "", False),  # 10
)
ATTN_LAYERS = tuple(i for i, layer in enumerate(LAYERS) if layer.attention)  # each has a gate in attn_gate_bank
VE_LAYERS = tuple(i for i, layer in enumerate(LAYERS) if layer.value_embed is not None)  # and in ve_gate_bank
GATE_DIM = 12  # gates read the first 12 channels


class Scalars:
    """Named views of the packed float32 `scalars` parameter (one Adam parameter) of L
    layers: [0, L) resid_lambda, [L, 3L) sa_lambda, then smear, backout and skip lambdas.
    Each view is taken where it is read (so the compiled graph takes it there too)."""

    def __init__(self, flat: Tensor):
        self.flat, self.L = flat, (flat.numel() - 3) // 3

    @staticmethod
    def size(num_layers: int) -> int:
        return 3 * num_layers + 3

    @property
    def resid_lambda(self) -> Tensor:  # (L,): weight of the residual stream before each layer
        return self.flat[:self.L]

    @property
    def sa_lambda(self) -> Tensor:  # (L, 2): scales of each attention's W_qkv and W_o
        return self.flat[self.L:3 * self.L].view(self.L, 2)

    @property
    def smear_lambda(self) -> Tensor:  # (): the smear gate's scale
        return self.flat[3 * self.L]

    @property
    def backout_lambda(self) -> Tensor:  # (): how much of the backout layer's output is subtracted
        return self.flat[3 * self.L + 1]

    @property
    def skip_lambda(self) -> Tensor:  # (): the U-net skip's gate, through a sigmoid
        return self.flat[3 * self.L + 2]


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class YaRNRotary(nn.Module):
    """Half-truncated rotary embedding with YaRN frequency updates (ALGORITHM.md 2.9).

    The first head_dim/2 channels rotate in adjacent pairs (2j, 2j+1) with frequency
    f_j = (1/1024)^(j/(head_dim/4 - 1)); the other half does not rotate. Applying it is
    `x * cos_table + flip_pairs(x) * sin_table`, tables in bf16 for `max_positions`.
    Arithmetic as the record: frequencies, angles and cos/sin in float32, then bf16.
    """

    def __init__(self, head_dim: int, max_positions: int, block_size: int):
        super().__init__()
        self.head_dim, self.max_positions, self.block_size = head_dim, max_positions, block_size
        self.register_buffer("factor1", torch.empty(max_positions, head_dim, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("factor2", torch.empty(max_positions, head_dim, dtype=torch.bfloat16), persistent=False)
        self.reset()

    def reset(self):
        # on the tables' device, so that a window change copies nothing from the host
        self.freqs = (1 / 1024) ** torch.linspace(0, 1, self.head_dim // 4, dtype=torch.float32,
                                                  device=self.factor1.device)
        self.attn_scale = 0.1
        self._build_tables()

    def _build_tables(self):
        if self.factor1.is_meta:
            return
        dev = self.factor1.device
        pos = torch.arange(self.max_positions, dtype=torch.float32, device=dev)
        theta = torch.outer(pos, self.freqs)
        cos, sin = theta.cos(), theta.sin()
        half = self.head_dim // 2
        f1 = torch.cat([cos.repeat_interleave(2, dim=-1), cos.new_ones(self.max_positions, half)], dim=-1)
        f2 = torch.cat([torch.stack([sin, -sin], dim=-1).flatten(-2), sin.new_zeros(self.max_positions, half)], dim=-1)
        # copy in place: the buffers keep their identity, so a compiled graph stays valid
        self.factor1.copy_(f1)
        self.factor2.copy_(f2)

    def set_state(self, freqs: Tensor, attn_scale: float):
        """Restore saved frequencies and attention scale (save_model / load_model)."""
        self.freqs = freqs.to(device=self.factor1.device, dtype=torch.float32)
        self.attn_scale = float(attn_scale)
        self._build_tables()

    def update_window(self, old: int, new: int):
        """YaRN: stretch the low frequencies when the long window grows old -> new blocks
        (float32 tensor math on the float32 frequencies; attn_scale a Python float)."""
        r = self.block_size * old * self.freqs / (2 * math.pi)
        s = old / new
        w = ((r - 1) / (32 - 1)).clamp(0, 1)
        self.freqs = self.freqs * (s + w * (1 - s))
        self.attn_scale *= 0.2 * math.log(new / old) + 1
        self._build_tables()

    def forward(self, x: Tensor) -> Tensor:
        """x: (T, heads, W), W a multiple of head_dim. Row t spans W / head_dim consecutive
        positions: with W = head_dim it is position t; paired heads pass (T, H/2, 2*head_dim)
        so that the first head of each adjacent pair rotates at 2t and the second at 2t+1."""
        T, W = x.size(0), x.size(-1)
        n = T * (W // self.head_dim)
        f1, f2 = self.factor1[:n].view(T, 1, W), self.factor2[:n].view(T, 1, W)
        x_flip = x.view(*x.shape[:-1], -1, 2).flip(-1).view(x.shape)
        return f1 * x + f2 * x_flip


@dataclass
class AttentionInputs:
    """What one attention layer takes besides its input x, for one forward pass."""
    cu_seqlens: Tensor  # document starts (int32), padded with T
    max_seqlen: int  # longest document
    window: int  # sliding window, tokens
    rotary: YaRNRotary
    attn_fn: Callable  # the backend: (q, k, v, cu_seqlens, max_seqlen, window, scale) -> y
    sa_lambda: Tensor  # (2,): scales of W_qkv and W_o
    attn_gate: Tensor  # (H, GATE_DIM): the output gate
    ve: Tensor | None = None  # (T, d): the value embedding, when the layer has one
    ve_gate: Tensor | None = None  # (H, GATE_DIM): its gate


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

    def forward(self, x: Tensor, a: AttentionInputs) -> Tensor:
        T, H, D, d = x.size(0), self.num_heads, self.head_dim, self.dim
        rotary, attn_fn, cu_seqlens, max_seqlen, window = a.rotary, a.attn_fn, a.cu_seqlens, a.max_seqlen, a.window
        q, k, v = F.linear(x, a.sa_lambda[0] * self.qkvo[: 3 * d].type_as(x)).view(T, 3, H, D).unbind(1)
        q, k = norm(q), norm(k)
        gate_in = x[:, :GATE_DIM]
        if a.ve is not None:
            v = v + 2 * torch.sigmoid(F.linear(gate_in, a.ve_gate.type_as(x)))[..., None] * a.ve.view(T, H, D)
        if self.paired:
            # Heads h and h + H/2 form a pair: the (T, H, D) memory viewed as (2T, H/2, D)
            # puts heads 0..H/2-1 at position 2t and H/2..H-1 at 2t + 1; documents double
            # in length. Rotary follows the head index's parity, not the slot (ALGORITHM.md 2.8):
            # viewed as (T, H/2, 2D), each adjacent head pair (2m, 2m+1) takes the angles of
            # positions 2t and 2t+1, so in pair (1, 4) head 1 (slot 2t) rotates at 2t+1.
            q, k = (rotary(t.view(T, H // 2, 2 * D)).view(2 * T, H // 2, D) for t in (q, k))
            v = v.reshape(2 * T, H // 2, D)
            y = attn_fn(q, k, v, 2 * cu_seqlens, 2 * max_seqlen, window, rotary.attn_scale)
            y = y.reshape(T, H, D)
        else:
            q, k = rotary(q), rotary(k)
            if self.key_offset:
                # partial key offset: the keys' channels [D/4, D/2) and [3D/4, D) come from
                # the previous position, so one layer can match "the token after X"
                k = torch.cat([k[:1], k[:-1]], dim=0).where(self._offset_mask(k), k)
            y = attn_fn(q, k, v, cu_seqlens, max_seqlen, window, rotary.attn_scale)
        y = y * torch.sigmoid(F.linear(gate_in, a.attn_gate.type_as(x)))[..., None]
        return F.linear(y.reshape(T, d), a.sa_lambda[1] * self.qkvo[3 * d:].type_as(x))

    def _offset_mask(self, k: Tensor) -> Tensor:
        D = self.head_dim
        c = torch.arange(D, device=k.device)
        return ((c >= D // 4) & (c < D // 2)) | (c >= 3 * D // 4)


class MLP(nn.Module):
    def __init__(self, dim: int, fused: bool = False):
        super().__init__()
        self.dim = dim
        self.c_fc = nn.Parameter(torch.empty(4 * dim, dim, dtype=torch.bfloat16))
        self.c_proj = nn.Parameter(torch.empty(4 * dim, dim, dtype=torch.bfloat16))
        self.c_fc.label, self.c_proj.label = "mlp_fc", "mlp_proj"
        self.fused = fused  # fused_mlp instead of unfused_mlp (RunPlan.fused_mlp)

    def reset_parameters(self):
        bound = math.sqrt(3) * 0.5 * self.dim ** -0.5
        with torch.no_grad():
            self.c_fc.uniform_(-bound, bound)
            self.c_proj.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return (fused_mlp if self.fused else unfused_mlp)(x, self.c_fc.type_as(x), self.c_proj.type_as(x))


class Block(nn.Module):
    """One layer: x + attn(norm(x)) (when LAYERS gives it attention), then x + mlp(norm(x))."""

    def __init__(self, layer: int, args: Hyperparameters, fused_mlp: bool = False):
        super().__init__()
        self.layer = layer
        spec = LAYERS[layer]
        self.attn = Attention(args.model_dim, args.num_heads, args.head_dim, paired=spec.attention == "paired",
                              key_offset=spec.window == "long") if spec.attention else None
        self.mlp = MLP(args.model_dim, fused_mlp)

    def forward(self, x: Tensor, attn_inputs: AttentionInputs | None) -> Tensor:
        if self.attn is not None:
            x = x + self.attn(norm(x), attn_inputs)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """The 11-layer speedrun GPT. forward() returns the summed multi-token-prediction loss
    in training mode and the mean cross-entropy in eval mode. `plan` (RunPlan) says which
    kernels and dtypes it runs; it is fixed for the model's life."""

    def __init__(self, args: Hyperparameters, max_positions: int, plan: RunPlan | None = None):
        super().__init__()
        if args.num_layers != len(LAYERS):
            raise ValueError(f"num_layers={args.num_layers}: the layer-specific layout needs 11")
        if args.num_heads % 2 or args.model_dim != args.num_heads * args.head_dim:
            raise ValueError(f"need an even num_heads and model_dim == num_heads * head_dim, got "
                             f"{args.num_heads} x {args.head_dim} vs {args.model_dim}")
        self.args = args
        self.plan = plan or RunPlan(torch.device("cpu"))
        V, d, H = next_multiple_of_n(args.vocab_size, 128), args.model_dim, args.num_heads
        self.padded_vocab = V
        bf16 = torch.bfloat16
        self.lm_head = nn.Parameter(torch.empty(V, d, dtype=bf16))
        self.embed = nn.Parameter(torch.empty(V, d, dtype=bf16))  # used from the split on
        self.value_embeds = nn.ParameterList([nn.Parameter(torch.empty(V, d, dtype=bf16)) for _ in range(3)])
        self.blocks = nn.ModuleList([Block(i, args, self.plan.fused_mlp) for i in range(args.num_layers)])
        self.attn_gate_bank = nn.Parameter(torch.empty(len(ATTN_LAYERS), H, GATE_DIM, dtype=bf16))
        self.ve_gate_bank = nn.Parameter(torch.empty(len(VE_LAYERS), H, GATE_DIM, dtype=bf16))
        self.smear_gate = nn.Parameter(torch.empty(1, GATE_DIM, dtype=bf16))
        self.skip_gate = nn.Parameter(torch.empty(1, GATE_DIM, dtype=bf16))
        self.scalars = nn.Parameter(torch.empty(Scalars.size(args.num_layers), dtype=torch.float32))
        self.x0_lambda = nn.Parameter(torch.empty(args.num_layers, dtype=torch.float32))
        for name in ("lm_head", "embed", "attn_gate_bank", "ve_gate_bank", "smear_gate", "skip_gate",
                     "scalars", "x0_lambda"):
            getattr(self, name).label = name
        for p in self.value_embeds:
            p.label = "value_embed"
        self.rotary = YaRNRotary(args.head_dim, max_positions, args.block_size)
        # the gradient the trainer's backward gives the loss: (loss / grad_accum).backward()
        self.loss_grad_scale = 1 / self.plan.grad_accum
        self.split_done = False  # embed split off from lm_head yet?
        self.windows = windows_at(0, args)  # (short, long) in blocks, set by the schedule

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
        sc = self.scalar_views()
        sc.resid_lambda.fill_(1.1)
        sc.sa_lambda.copy_(torch.tensor([0.5, 1.0]))
        sc.smear_lambda.fill_(0.0)
        sc.backout_lambda.fill_(0.5)
        sc.skip_lambda.fill_(-1.5)
        self.reset_schedule_state()

    def scalar_views(self) -> Scalars:
        return Scalars(self.scalars)

    def reset_schedule_state(self):
        """Back to the state of step 0: embed not split, first windows, initial YaRN."""
        self.split_done = False
        self.windows = windows_at(0, self.args)
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
        x = self.hidden(input_seq, cu_seqlens, max_seqlen)
        plan = self.plan
        if self.training:
            if plan.fused_loss:
                return fused_loss_head(x, self.lm_head, target_seq, mtp_weights, self.loss_grad_scale,
                                       one_pass=plan.fused_loss == "one pass", compiled=plan.compile)
            if plan.fp8:
                logits = fp8_mm(x, self.lm_head, FP8_X_SCALE, FP8_W_SCALE, FP8_GRAD_SCALE, plan.compile)[0]
            else:
                logits = F.linear(x, self.lm_head.type_as(x))
            return training_loss(logits, target_seq, mtp_weights)
        return validation_loss(x, self.lm_head.type_as(x), target_seq)

    @torch.no_grad()
    def next_token_logits(self, tokens: Tensor) -> Tensor:
        """Softcapped float32 logits (vocab_size,) for the token after `tokens` (one document,
        starting with BOS), as evaluation computes them (for sampling)."""
        T = tokens.numel()
        cu = torch.tensor([0, T], dtype=torch.int32, device=tokens.device)
        x = self.hidden(tokens.to(torch.int32), cu, T)
        return softcap(F.linear(x[-1:], self.lm_head.type_as(x))).float()[0, :self.args.vocab_size]

    def hidden(self, input_seq: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """The final normalized hidden states (T, d): everything before the lm_head."""
        sc = self.scalar_views()
        resid_lambda, sa_lambda = sc.resid_lambda, sc.sa_lambda
        bs = self.args.block_size
        window = dict(short=self.windows[0] * bs, long=self.windows[1] * bs)

        # activations in bf16 on GPU; in fp32 on CPU, where bf16 matmuls are ~10x slower
        # (RunPlan.act_dtype; .to / .type_as are no-ops when the dtype already matches)
        act = self.plan.act_dtype
        x = F.embedding(input_seq, self.embed if self.split_done else self.lm_head).to(act)
        ves = [F.embedding(input_seq, table).to(act) for table in self.value_embeds]
        # smear: mix a gated fraction of the previous token's embedding into each token
        gate = sc.smear_lambda * torch.sigmoid(F.linear(x[1:, :GATE_DIM], self.smear_gate.type_as(x)))
        x = torch.cat([x[:1], x[1:] + gate * x[:-1]])
        x = x0 = norm(x)

        skip = backout = None
        for i, (block, layer) in enumerate(zip(self.blocks, LAYERS)):
            if layer.skip == "to":
                g = torch.sigmoid(sc.skip_lambda) * 2 * torch.sigmoid(
                    F.linear(x0[:, :GATE_DIM], self.skip_gate.type_as(x)))
                x = x + g * skip
            if i == 0:  # x is x0 here: one multiply
                x = (resid_lambda[0] + self.x0_lambda[0]) * x
            else:
                x = resid_lambda[i] * x + self.x0_lambda[i] * x0
            attn_inputs = None
            if layer.attention:
                has_ve = layer.value_embed is not None
                attn_inputs = AttentionInputs(
                    cu_seqlens, max_seqlen, window[layer.window], self.rotary, self.plan.attn_fn, sa_lambda[i],
                    self.attn_gate_bank[ATTN_LAYERS.index(i)], ves[layer.value_embed] if has_ve else None,
                    self.ve_gate_bank[VE_LAYERS.index(i)] if has_ve else None)
            x = block(x, attn_inputs)
            if layer.skip == "from":
                skip = x
            if layer.backout:
                backout = x
        return norm(x - sc.backout_lambda * backout)


EVAL_HEAD_CHUNK = 32768


def softcap(logits: Tensor) -> Tensor:
    return 23 * torch.sigmoid((logits + 5) / 7.5)


def validation_loss(x: Tensor, W: Tensor, targets: Tensor) -> Tensor:
    """The validation metric (ALGORITHM.md 2.6): mean cross-entropy of the softcapped head output,
    in the record's op order: the softcap runs in the activation dtype (bf16 tensor ops on
    GPU) and only its result is cast to float32 for the cross-entropy. (A float32 softcap of
    the bf16 logits moves the loss by up to ~1e-3, the size of a record's margin.) The head
    is applied in chunks of EVAL_HEAD_CHUNK rows to bound the logits' memory."""
    total = x.new_zeros((), dtype=torch.float32)
    for s in range(0, x.size(0), EVAL_HEAD_CHUNK):
        logits = softcap(F.linear(x[s:s + EVAL_HEAD_CHUNK], W)).float()
        total = total + F.cross_entropy(logits, targets[s:s + EVAL_HEAD_CHUNK], reduction="sum")
    return total / x.size(0)


class _MTPLoss(torch.autograd.Function):
    """sum_t sum_k w[k] * CE(softcap(logits)_t, target_{t+k}), positions past the end adding
    nothing, in float32 from the raw logits (ALGORITHM.md 2.6), without a (T, V) buffer per offset.

    With W_t = sum_k w_k [t + k < T] and z = softcap(logits), the loss is
    sum_t W_t lse_t - sum_t sum_k w_k z[t, target_{t+k}] (the picked values gathered from the
    raw logits, then softcapped), and its gradient
    dL/dlogits = (W_t softmax(z) - sum_k w_k [v == target_{t+k}]) * softcap'(logits):
    one elementwise expression over (T, V) written once, in the logits' dtype. Compiled, the
    forward is one reduction and the backward one fused kernel with one (T, V) output.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        T, K = logits.size(0), weights.size(0)
        pos = torch.arange(T, device=targets.device)[:, None] + torch.arange(K, device=targets.device)
        picked_targets = targets[pos.clamp(max=T - 1)]  # (T, K): target_{t+k}
        w = weights[None, :] * (pos < T)  # (T, K): w_k, or 0 past the end
        # softcap bounds z to (0, 23): sum(exp(z)) <= V e^23 cannot overflow fp32, so the
        # log-sum-exp needs no max pass (one reduction, nothing (T, V) materialized)
        lse = torch.exp(softcap(logits.float())).sum(dim=-1).log()
        picked = softcap(logits.gather(1, picked_targets).float())
        ctx.save_for_backward(logits, lse, picked_targets, w)
        return (w.sum(1) * lse).sum() - (w * picked).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, lse, picked_targets, w = ctx.saved_tensors
        x = logits.float()
        s = torch.sigmoid((x + 5) / 7.5)
        vocab = torch.arange(logits.size(1), device=logits.device)
        dz = w.sum(1, keepdim=True) * torch.exp(23 * s - lse[:, None])
        for k in range(w.size(1)):  # K <= 3: unrolled, fused into the one kernel when compiled
            dz = dz - w[:, k:k + 1] * (picked_targets[:, k:k + 1] == vocab)
        return (grad * dz * (23 / 7.5) * s * (1 - s)).to(logits.dtype), None, None


def mtp_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Training loss from the raw (not softcapped) logits, see _MTPLoss: float32 math,
    summed over positions and prediction offsets k with weights[k]."""
    return _MTPLoss.apply(logits, targets, weights)


training_loss = mtp_loss  # what GPT.forward applies to the lm_head's output in training


def rotary_positions(args: Hyperparameters) -> int:
    """Rotary table length: 2x (paired heads) the longest packed sequence of a rank."""
    longest = max(max(args.train_batch_sizes), args.val_batch_size) // VIRTUAL_RANKS
    return 2 * longest


def build_model(args: Hyperparameters, plan) -> GPT:
    """Builds and initializes the model for `plan` (a RunPlan; a device means that device's
    reference plan, base_plan). On `meta`: no allocation, no initialization."""
    if not isinstance(plan, RunPlan):
        plan = base_plan(args, Machine.of(plan))
    with torch.device(plan.device):
        model = GPT(args, rotary_positions(args), plan)
    if not plan.meta:
        model.reset_parameters()
    return model


# =====================================================================================
# 6. Data
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


class DataError(RuntimeError):
    """Training or validation data that cannot be used (ran out, bad token ids): one line."""


def write_shard(path, tokens) -> None:
    """Writes tokens (any integer array-like, values in [0, 65536)) as one shard file, in the
    format above; written to a temporary file, then renamed (no half-written shard)."""
    import numpy as np

    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError(f"{path}: token ids must be in [0, 65536)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def shard_token_count(path) -> int:
    """Checks a token shard's header against its file size; returns its token count. A
    truncated download or a file of the wrong kind fails here with a message naming it."""
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
    return num_tokens


def read_shard(path, vocab_size: int | None = None) -> Tensor:
    """Read one token shard and return its tokens as a 1-D uint16 tensor (on CPU). With
    vocab_size, a token id >= vocab_size is an error naming the shard and its position."""
    import numpy as np

    num_tokens = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_INTS * 4)
    if vocab_size is not None and num_tokens and int(tokens.max()) >= vocab_size:
        pos = int(np.flatnonzero(tokens >= vocab_size)[0])
        raise DataError(f"bad token shard {path}: token id {int(tokens[pos])} at position {pos:,} is not "
                        f"below --vocab_size={vocab_size}")
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def list_shards(pattern, flag: str = "", preset: str = "") -> list[Path]:
    """Sorted list of the files matching `pattern`; a clear error if there are none, naming
    `flag` and suggesting the sample corpus only where --preset tiny was not given."""
    files = sorted(Path(p) for p in glob.glob(str(pattern)))
    if not files:
        where = f" ({flag})" if flag else ""
        last = ("check the folder and file names of that glob" if preset == "tiny" else
                "or use the bundled sample corpus with `--preset tiny`")
        raise FileNotFoundError(
            f"no token shards match {str(pattern)!r}{where}. Download FineWeb with "
            f"`python data/cached_fineweb10B.py 9`, make shards of your own text with "
            f"`python data/fineweb.py --input FILE ...`, {last} (see data/README.md)")
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


def _merge_segments(starts: list, T: int, max_len: int, limit: int) -> list:
    """Starts of at most `limit` segments covering [0, T), each at most max_len tokens long,
    made by merging adjacent segments of `starts` (each ending where the next starts, the
    last at T): the adjacent pair with the shortest merged length first, so the fewest and
    shortest documents share a segment. Should that get stuck, segments are packed left to
    right (which needs the fewest segments); if even that needs more than `limit`, raises
    DataError."""
    n = len(starts)
    length = [b - a for a, b in zip(starts, starts[1:] + [T])]
    nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
    heap = [(length[i] + length[i + 1], i, i + 1) for i in range(n - 1)]
    heapq.heapify(heap)
    count = n
    while count > limit and heap:
        total, i, j = heapq.heappop(heap)
        if total > max_len:
            break  # every pair left (valid or stale) is longer
        if not (alive[i] and alive[j] and nxt[i] == j and length[i] + length[j] == total):
            continue  # stale: one side has been merged since
        length[i], alive[j], nxt[i] = total, False, nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
            heapq.heappush(heap, (total + length[nxt[j]], i, nxt[j]))
        if prv[i] >= 0:
            heapq.heappush(heap, (length[prv[i]] + total, prv[i], i))
        count -= 1
    if count <= limit:
        return [s for s, keep in zip(starts, alive) if keep]
    packed, run = [starts[0]], 0
    for s, e in zip(starts, starts[1:] + [T]):
        if run + e - s > max_len:
            packed.append(s)
            run = 0
        run += e - s
    if len(packed) > limit:
        raise DataError(f"a micro-batch of {T} tokens needs {len(packed)} segments of at most "
                        f"{max_len} tokens, more than the {limit} that cu_seqlens can hold")
    return packed


def _pack_cu_seqlens(starts: list, T: int, L: int, max_len: int, state: dict, what: str) -> Tensor:
    """cu_seqlens = sequence starts (first is 0), then T, padded with T to length L.

    With more than L-1 sequences, adjacent short ones are merged (they then attend to each
    other; rare, and it keeps the shape fixed), never into a segment longer than max_len,
    the max_seqlen the attention kernel is told (it sizes its work by it).
    """
    if len(starts) > L - 1:
        if not state.get("warned"):
            warnings.warn(
                f"{what}: a micro-batch of {T} tokens holds {len(starts)} sequences, more "
                f"than the {L - 1} that cu_seqlens (length {L}) can describe; adjacent short "
                f"ones are merged, none past {max_len} tokens (warning shown once)", stacklevel=3)
            state["warned"] = True
        starts = _merge_segments(starts, T, max_len, L - 1)
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

    def __init__(self, path: Path, vocab_size: int | None = None):
        # not a daemon: at exit Python waits for the (short) read instead of killing the
        # thread inside torch, which aborts the process ("terminate called ...")
        super().__init__(daemon=False)
        self.path, self.vocab_size = path, vocab_size
        self.tokens = self.doc_starts = self.error = None
        self.start()

    def run(self):
        try:
            self.tokens = read_shard(self.path, self.vocab_size)
            self.doc_starts = (self.tokens == BOS_ID).nonzero().flatten().tolist()
        except BaseException as e:  # re-raised in the training process by result()
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.tokens, self.doc_starts


class _DocumentStream:
    """The documents of the training shards, one shard at a time.

    A document runs from a BOS to the next BOS or the end of its shard; tokens before the
    first BOS of a shard are skipped. next_document() returns None when the current shard
    has no more documents: moving on is the caller's choice (open_next_shard), so that a step
    never mixes two shards. When a shard is opened, the next one starts loading in a
    background thread.
    """

    def __init__(self, pattern, vocab_size: int | None = None):
        self.pattern, self.vocab_size = pattern, vocab_size
        self.files = list_shards(pattern)
        self.next_file = 0
        self.pending = _ShardLoader(self.files[0], vocab_size)  # start reading before the first step
        self.shards_used = 0
        self.tokens_used = 0  # tokens in the shards opened so far
        self.tokens, self.starts, self.doc = None, [], 0

    def open_next_shard(self):
        if self.pending is None:
            raise DataError(
                f"the training data ran out after {self.shards_used} shard(s) / "
                f"{self.tokens_used:,} tokens (files matching {str(self.pattern)!r}). Get "
                f"more with `python data/cached_fineweb10B.py N` (N train shards of 100M "
                f"tokens each; the record needs about 9) or train for fewer steps")
        self.tokens, self.starts = self.pending.result()
        self.doc = 0
        self.shards_used += 1
        self.tokens_used += len(self.tokens)
        self.next_file += 1
        self.pending = (_ShardLoader(self.files[self.next_file], self.vocab_size)
                        if self.next_file < len(self.files) else None)

    def position(self) -> tuple[int, int, int]:
        """Where the stream stands: (shards opened, next document in the current one, tokens
        of the shards opened), for a checkpoint."""
        return self.shards_used, self.doc, self.tokens_used

    def seek(self, position) -> None:
        """Continue from a position() of a stream over the same files (resume)."""
        shards_used, doc, tokens_used = (int(v) for v in position)
        if shards_used == 0:
            return
        if shards_used > len(self.files):
            raise DataError(f"the checkpoint's data position is shard {shards_used}, but only {len(self.files)} "
                            f"shard(s) match {str(self.pattern)!r}")
        self.pending = _ShardLoader(self.files[shards_used - 1], self.vocab_size)
        self.next_file, self.shards_used = shards_used - 1, shards_used - 1
        self.open_next_shard()
        self.doc, self.tokens_used = doc, tokens_used

    def next_document(self) -> tuple | None:
        """(tokens of its shard, start, length) of the current shard's next document, or
        None when the shard has none left."""
        if self.doc >= len(self.starts):
            return None
        start = self.starts[self.doc]
        end = self.starts[self.doc + 1] if self.doc + 1 < len(self.starts) else len(self.tokens)
        self.doc += 1
        return self.tokens, start, end - start


def _fill_step(docs: _DocumentStream, num_tokens: int, max_seq_len: int) -> list | None:
    """The buffers of one global step: for each of the 8 virtual ranks in order, whole
    documents until exactly `num_tokens` tokens are gathered, all from the current shard.

    Returns, per virtual rank, pieces (tokens, start, length). Each document is cut to
    max_seq_len tokens and the last one to what is left of the buffer; the rest of a cut
    document is dropped (the next buffer starts at a BOS again). None if the shard runs out
    of documents first: the partial step is then discarded (ALGORITHM.md 1.3).
    """
    step = []
    for _ in range(VIRTUAL_RANKS):
        pieces, need = [], num_tokens
        while need > 0:
            doc = docs.next_document()
            if doc is None:
                return None
            tokens, start, length = doc
            take = min(length, max_seq_len, need)
            pieces.append((tokens, start, take))
            need -= take
        step.append(pieces)
    return step


def train_data_generator(pattern, batch_size: int, rank: int, world_size: int,
                         max_seq_len: int, device="cpu", vocab_size: int | None = None,
                         position: tuple | None = None) -> TrainBatches:
    """BOS-aligned training batches, from the start of the shards or from `position`
    (a checkpoint's TrainBatches.position()); a TrainBatches, used like a generator.

    Each next() yields one step for this process: a list of grad_accum tuples
    (inputs int32 (T,), targets int64 (T,), cu_seqlens int32 (L,)) with
    T = batch_size // 8 tokens per virtual rank and L = max(128, next_multiple_of_n(
    T // 300, 128)). For every step the 8 virtual ranks take, in order, disjoint runs
    of consecutive documents of one shard; every sequence starts with BOS and has at most
    max_seq_len tokens. A step that the current shard cannot fill is discarded and drawn
    again from the next shard (ALGORITHM.md 1.3). `gen.send(new_batch_size)` changes
    the global batch size, and the step it returns already has the new size. Running out of
    shards, or a token id >= vocab_size (when given), raises DataError.
    """
    grad_accum = _grad_accum_steps(world_size)
    _check_rank(rank, world_size)
    _tokens_per_rank(batch_size)
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    docs = _DocumentStream(pattern, vocab_size)  # validates the pattern now, not at the first next()
    if position is not None:
        docs.seek(position)
    return TrainBatches(docs, _train_steps(docs, batch_size, rank, grad_accum, max_seq_len, device), batch_size)


class TrainBatches:
    """One process's training steps (train_data_generator): next() gives the next step at
    the current batch size, send(B) the next step at batch size B; at(B) does whichever
    is needed. position() is where the stream stands, for a checkpoint."""

    def __init__(self, docs: _DocumentStream, steps, batch_size: int):
        self.docs, self.steps, self.batch_size, self.started = docs, steps, batch_size, False

    def __iter__(self):
        return self

    def __next__(self):
        self.started = True
        return next(self.steps)

    def send(self, batch_size: int):
        step = self.steps.send(batch_size)
        self.batch_size = batch_size
        return step

    def at(self, batch_size: int):
        if batch_size == self.batch_size:
            return next(self)
        if not self.started:  # a generator must start with next()
            raise ValueError(f"the first step's batch size {batch_size} differs from the stream's "
                             f"{self.batch_size}")
        return self.send(batch_size)

    def position(self) -> tuple:
        return self.docs.position()


def _train_steps(docs, batch_size, rank, grad_accum, max_seq_len, device):
    warn_state = {}
    own = range(rank * grad_accum, (rank + 1) * grad_accum)
    while True:
        T = _tokens_per_rank(batch_size)
        L = _cu_seqlens_length(T)
        # every process fills the buffers of all 8 virtual ranks, so that all of them discard
        # the same partial steps and know where their own start, but only builds the tensors
        # of its own ones
        while (buffers := _fill_step(docs, T + 1, max_seq_len)) is None:
            docs.open_next_shard()  # the step is drawn again from the next shard's first BOS
        step = []
        for v in own:
            pieces = buffers[v]
            buf = torch.cat([tokens[s:s + n] for tokens, s, n in pieces])
            starts, offset = [], 0
            for _, _, n in pieces:
                if offset < T:  # a sequence starting at T lives only in the targets
                    starts.append(offset)
                offset += n
            cu = _pack_cu_seqlens(starts, T, L, max_seq_len, warn_state, "train_data_generator")
            inputs = buf[:-1].to(torch.int32)
            targets = buf[1:].to(torch.int64)
            step.append(_to_device((inputs, targets, cu), device))
        new_batch_size = yield step
        if new_batch_size is not None:
            batch_size = new_batch_size


def val_data_generator(pattern, batch_size: int, rank: int, world_size: int, device="cpu",
                       vocab_size: int | None = None):
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
    return _val_steps(files, pattern, batch_size, T, rank, grad_accum, device, vocab_size)


def _val_steps(files, pattern, B, T, rank, grad_accum, device, vocab_size):
    L = _cu_seqlens_length(T)
    warn_state = {}
    tokens = torch.empty(0, dtype=torch.uint16)
    next_file = 0
    step = 0
    while True:
        needed = (step + 1) * B + 1  # +1: the target of the last input
        while len(tokens) < needed and next_file < len(files):
            tokens = torch.cat([tokens, read_shard(files[next_file], vocab_size)])
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
            cu = _pack_cu_seqlens([0] + bos.tolist(), T, L, T, warn_state, "val_data_generator")
            out.append(_to_device((inputs, targets, cu), device))
        yield out
        step += 1


# =====================================================================================
# 7. Checks: flags, inputs, resume
# =====================================================================================

def check_config(args: Hyperparameters, world_size: int):
    if world_size < 1 or VIRTUAL_RANKS % world_size:
        raise ConfigError(f"WORLD_SIZE={world_size} does not divide {VIRTUAL_RANKS}: use 1, 2, 4 or 8 processes "
                          f"(gradient accumulation 8/world_size keeps the global batch)")
    sizes = [("train_batch_sizes", bs) for bs in args.train_batch_sizes] + [("val_batch_size", args.val_batch_size)]
    for name, bs in sizes:
        if bs % VIRTUAL_RANKS:
            raise ConfigError(f"--{name}: batch {bs} is not divisible by the {VIRTUAL_RANKS} ranks of the "
                              f"global batch ({world_size} processes x {VIRTUAL_RANKS // world_size} micro-batches)")
    if len(args.train_batch_sizes) != 3 or len(args.long_windows) != 3 or len(args.extension_windows) != 2:
        raise ConfigError("--train_batch_sizes and --long_windows take 3 values, --extension_windows 2")
    if args.val_tokens % args.val_batch_size:
        raise ConfigError(f"--val_tokens={args.val_tokens} is not divisible by --val_batch_size={args.val_batch_size}")
    if args.num_scheduled_iterations < 3:
        raise ConfigError("--num_scheduled_iterations must be at least 3 (one step per third)")
    if args.num_heads % 2:
        raise ConfigError(f"--num_heads={args.num_heads}: must be even (heads attend in pairs)")
    if args.head_dim % 4:
        raise ConfigError(f"--head_dim={args.head_dim}: must be a multiple of 4 (rotary and the key offset "
                          f"split each head in quarters)")
    if args.model_dim != args.num_heads * args.head_dim:
        raise ConfigError(f"--model_dim={args.model_dim} must equal --num_heads x --head_dim = "
                          f"{args.num_heads} x {args.head_dim} = {args.num_heads * args.head_dim}")


def _check_writable_dir(folder: Path, what: str) -> None:
    """ConfigError unless `folder` is (or can be made) a directory this process can write in."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {folder} ({e.strerror})") from None


def check_inputs(args: Hyperparameters, world_size: int, rank: int, device, continues_log: bool = False) -> str:
    """Everything about a run's inputs that can be known before compiling or warming up, on
    every rank: the attention backend and FP8 choices, the header of every train and val
    shard, the tokens the schedule needs against those the shards hold, and (rank 0) the log
    folder and the save path. Raises ConfigError (or ValueError naming a bad shard); returns
    a one-line summary of the data."""
    if args.attn_backend != "auto":
        forced_attention_backend(args.attn_backend, device)
    fp8_setting(args.fp8, device)
    for flag, available in (("fused_loss", fused_loss_available), ("fused_mlp", fused_mlp_available)):
        ok, why = available(args, device)
        if getattr(args, flag) == "on" and not ok:
            raise ConfigError(f"--{flag}=on: {why}")
    counts = {}
    for flag, pattern in (("--train_files", args.train_files), ("--val_files", args.val_files)):
        files = list_shards(pattern, flag, args.preset)
        sizes = [shard_token_count(f) for f in files]  # headers only: every shard, in seconds
        if 0 in sizes:
            raise ConfigError(f"token shard {files[sizes.index(0)]} ({flag}) holds no tokens")
        counts[flag] = (len(files), sum(sizes))
    N = total_steps(args)
    # each step takes T + 1 tokens per virtual rank; cut documents lose more, so this is a floor
    need = sum(batch_size_at(step, args) + VIRTUAL_RANKS for step in range(N))
    n_files, have = counts["--train_files"]
    if have < need:
        raise ConfigError(f"the training schedule ({N} steps) needs at least {need:,} tokens but the {n_files} "
                          f"shard(s) matching --train_files={args.train_files} hold {have:,}: add shards "
                          f"(python data/cached_fineweb10B.py N, or data/fineweb.py for your own text) "
                          f"or train for fewer steps")
    n_val, have_val = counts["--val_files"]
    if have_val < args.val_tokens + 1:
        raise ConfigError(f"--val_tokens={args.val_tokens} needs {args.val_tokens + 1:,} tokens but the {n_val} "
                          f"shard(s) matching --val_files={args.val_files} hold {have_val:,}")
    if rank == 0:
        _check_writable_dir(Path(args.log_dir), f"--log_dir={args.log_dir}")
        if args.run_id and (os.sep in args.run_id or args.run_id in (".", "..")):
            raise ConfigError(f"--run_id={args.run_id}: must be a plain file name")
        if args.run_id and not continues_log and (Path(args.log_dir) / f"{args.run_id}.txt").exists():
            raise _log_exists(Path(args.log_dir) / f"{args.run_id}.txt")
        if args.save_model:
            target = Path(args.save_model)
            if target.is_dir():
                raise ConfigError(f"--save_model={args.save_model} is a folder; give a file path")
            if not target.parent.is_dir():
                raise ConfigError(f"--save_model={args.save_model}: the folder {target.parent} does not exist")
            _check_writable_dir(target.parent, f"--save_model={args.save_model}")
    return (f"data: {n_files} train shard(s), {have:,} tokens (the schedule needs >= {need:,}); "
            f"{n_val} val shard(s), {have_val:,} tokens")


def checkpoint_run_id(state: dict, path) -> str:
    """The run id a checkpoint belongs to (older checkpoints: from its file name)."""
    return state.get("run_id") or Path(path).name.split(".step")[0]


def resume_note(args: Hyperparameters, state: dict) -> str:
    """The run_only flags a resumed run changed, for its log line ("" when none)."""
    saved = state["args"]
    changed = [f"--{k}={getattr(args, k)} (was {saved[k]})" for k in sorted(RUN_ONLY_FLAGS - {"resume", "run_id"})
               if k in saved and saved[k] != getattr(args, k)]
    return f"; changed: {', '.join(changed)}" if changed else ""


def check_resume(args: Hyperparameters, world_size: int) -> dict:
    """The checkpoint of --resume, checked against this run's flags and process count."""
    state = read_model_file(args.resume)
    if state["format"] != CHECKPOINT_FORMAT:
        raise ConfigError(f"--resume={args.resume}: a --save_model file has no optimizer or data state; "
                          f"resume from a --checkpoint_every checkpoint")
    saved = state["args"]
    differ = [f"--{k}={getattr(args, k)} (checkpoint: {saved[k]})" for k in saved
              if k not in RUN_ONLY_FLAGS and hasattr(args, k) and saved[k] != getattr(args, k)]
    if differ:
        raise ConfigError(f"--resume={args.resume}: the checkpoint was made with other values of "
                          f"{', '.join(differ)}")
    if state["world_size"] != world_size:
        raise ConfigError(f"--resume={args.resume}: the checkpoint was made by {state['world_size']} process(es), "
                          f"this run has {world_size}; resume with the same number")
    return state


# =====================================================================================
# 8. Files: the log, the model file, checkpoints
# =====================================================================================

def _log_exists(path: Path) -> ConfigError:
    return ConfigError(f"the log {path} exists already (an earlier run): choose another --run_id or move it away")


class Logger:
    """Prints on rank 0 and appends to logs/<run_id>.txt (rank 0 only). The file is created
    here and must not exist yet: an earlier run's log is never overwritten, only continued
    (append=True: a resumed run's own log, which may exist)."""

    def __init__(self, path: Path | None, append: bool = False):
        self.path = path
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a" if append else "x"):
                    pass
            except FileExistsError:
                raise _log_exists(path) from None
            except OSError as e:
                raise ConfigError(f"cannot create the log {path}: {e.strerror}") from None

    def __call__(self, msg: str = "", console: bool = True):
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        data = (msg + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                end = os.lseek(fd, 0, os.SEEK_END)
                try:
                    if os.write(fd, data) != len(data):  # one write per message
                        raise OSError(28, "No space left on device")
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, end)  # no torn last line
                    raise
            finally:
                os.close(fd)
        except OSError as e:
            path, self.path = self.path, None  # nothing more goes to this file
            raise ConfigError(f"cannot write the log {path}: {e.strerror}") from None


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


MODEL_FILE_FORMAT = "train_gpt model 1"
CHECKPOINT_FORMAT = "train_gpt checkpoint 1"


def model_state(model: GPT) -> dict:
    """What evaluating the model needs: configuration, weights, the embed split, the windows
    and the YaRN state (on the CPU)."""
    return dict(args=dataclasses.asdict(model.args), model={k: v.cpu() for k, v in model.state_dict().items()},
                split_done=model.split_done, windows=tuple(model.windows),
                rotary_freqs=model.rotary.freqs.cpu(), attn_scale=model.rotary.attn_scale)


def _save_atomically(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill mid-save leaves no broken file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None


def save_model(model: GPT, path) -> None:
    """Everything needed to evaluate the model (model_state), written atomically."""
    _save_atomically(dict(format=MODEL_FILE_FORMAT, **model_state(model)), Path(path))


def read_model_file(path) -> dict:
    """The contents of a save_model file or a checkpoint; ConfigError naming a bad path."""
    try:
        state = torch.load(path, map_location="cpu")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such model file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; expected a checkpoint or model file") from None
    except Exception as e:  # torch's own message would suggest weights_only=False: never for a checkpoint
        raise ConfigError(f"{path}: not a model saved by train_gpt.py (expected a --save_model or "
                          f"--checkpoint_every file; reading it as one failed: {type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") not in (MODEL_FILE_FORMAT, CHECKPOINT_FORMAT):
        raise ConfigError(f"{path}: not a model saved by train_gpt.py --save_model or --checkpoint_every")
    return state


def restore_model_state(model: GPT, state: dict) -> None:
    model.load_state_dict(state["model"])
    model.split_done = state["split_done"]
    model.windows = tuple(state["windows"])
    model.rotary.set_state(state["rotary_freqs"], state["attn_scale"])


def load_model(path, device="cpu", attn_backend: str = "auto", log=None) -> GPT:
    """A model saved by save_model (--save_model) or a checkpoint, ready to evaluate on
    `device` (its plan chooses and proves only the attention backend; `log` gets the table)."""
    state = read_model_file(path)
    args = dataclasses.replace(Hyperparameters(**state["args"]), attn_backend=attn_backend, compile="off")
    model = build_model(args, resolve_plan(args, device, log=log, training=False))
    restore_model_state(model, state)
    return model


def write_checkpoint(folder: Path, run_id: str, step: int, train_ms: float, model: GPT, opt: Optimizers,
                     data_position: tuple, rank: int, world_size: int, plan: RunPlan,
                     stop: RunStop | None = None) -> Path | None:
    """Writes folder/<run_id>.stepNNNNNN.pt on every rank's behalf (rank 0 writes; returns
    its path, None on other ranks): the model, every rank's optimizer state and pending
    gradients, the step, the data position, the train time and the RNG; keeps the last two.
    Collective: every rank calls it."""
    import io

    mine = dict(opt=opt.state_dict(), grads=opt.pending_grads())
    mine = torch.utils._pytree.tree_map(lambda t: t.cpu() if isinstance(t, Tensor) else t, mine)
    if world_size > 1:  # as torch.save bytes: gather_object's pickling mishandles some dtypes
        buf = io.BytesIO()
        torch.save(mine, buf)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(buf.getvalue(), gathered, dst=0)
        if stop is not None and stop.requested:
            stop.no_peers_needed()  # what is left of this stop is rank 0's own file write
        if rank != 0:
            return None
        ranks = [torch.load(io.BytesIO(b)) for b in gathered]
    else:
        ranks = [mine]
    state = dict(format=CHECKPOINT_FORMAT, **model_state(model), run_id=run_id, step=step, train_ms=train_ms,
                 world_size=world_size, data=data_position, ranks=ranks, rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if plan.cuda else None)
    path = folder / f"{run_id}.step{step:06d}.pt"
    _save_atomically(state, path)
    for old in sorted(folder.glob(f"{glob.escape(run_id)}.step*.pt"))[:-2]:
        old.unlink()
    return path


def restore_checkpoint(state: dict, model: GPT, opt: Optimizers, rank: int, plan: RunPlan) -> tuple:
    """Restores a checkpoint (after the warm-up, which resets to the initial state);
    returns (step, train_ms, data position)."""
    restore_model_state(model, state)
    mine = state["ranks"][rank]
    opt.load_state_dict(mine["opt"])
    opt.set_pending_grads(mine["grads"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and plan.cuda:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["train_ms"], state["data"]


# =====================================================================================
# 9. Training: steps, warm-up, the timed loop
# =====================================================================================

@torch.no_grad()
def evaluate(forward, model: nn.Module, args: Hyperparameters, rank: int = 0, world_size: int = 1,
             device="cpu", max_steps: int | None = None) -> float:
    """Mean validation loss of --val_tokens tokens (or max_steps val steps) through
    `forward` (the model or its compiled form), averaged over the ranks."""
    model.eval()
    loader = val_data_generator(args.val_files, args.val_batch_size, rank, world_size, device=device,
                                vocab_size=args.vocab_size)
    n = args.val_tokens // args.val_batch_size
    n = min(n, max_steps) if max_steps else n
    total = torch.zeros((), device=device)
    count = 0
    for _ in range(n):
        for inputs, targets, cu_seqlens in next(loader):
            total += forward(inputs, targets, cu_seqlens, inputs.numel())
            count += 1
    total /= count
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    model.train()
    return total.item()


STOP_GRACE_S = 10.0  # how long a stop waits for its collectives before it ends the process


class RunStop:
    """How a run ends before its last step, in one object that main() makes and the Trainer
    holds: the signals, a peer that is gone, the hang watcher, the exit code and the log's
    last line.

    Ctrl-C / SIGTERM inside the training loop (`with loop()`): the step in progress finishes,
    then the loop stops (with a checkpoint when checkpointing is on); elsewhere, or at a
    second signal, at once (KeyboardInterrupt). With several processes a stop must not wait
    for a peer that is gone: torchrun sends SIGTERM to the survivors when a worker dies, and
    on GPUs a collective with a dead peer may block instead of raising. A main thread
    blocked there never runs the signal handler (Python runs handlers between bytecodes), so
    watch()'s thread hears the signal instead, and ends the process if the stop's
    collectives are not done STOP_GRACE_S seconds later."""

    def __init__(self):
        self.in_loop = False
        self.requested = False
        self.peers_done = threading.Event()

    def install(self) -> None:
        """Ctrl-C and SIGTERM go to this object (call from the main thread)."""
        import signal
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.in_loop and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def loop(self):
        """The training loop: a signal inside asks for a stop after the step in progress."""
        self.in_loop = True
        try:
            yield
        finally:
            self.in_loop = False

    def agreed(self, world_size: int, device, checked: bool, every: int) -> bool:
        """Whether a stop was asked for on any rank: all ranks stop after the same step. With
        a loss read every `every` > 1 steps (GPUs) the ranks agree only on steps whose loss
        was read (checked: the GPU has been waited for anyway), so other steps need no sync."""
        if world_size == 1:
            return self.requested
        if every > 1 and not checked:
            return False
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def no_peers_needed(self) -> None:
        """What is left of this stop is local (rank 0's own file write): no hang to catch."""
        self.peers_done.set()

    def watch(self, on_hang) -> None:
        """After install(): a thread reads the signal numbers that the C-level handler writes
        to the wakeup fd (even while the main thread is blocked) and, after the first, calls
        on_hang(signal name) unless the stop's collectives finish within STOP_GRACE_S."""
        import signal
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

        def watch():
            signum = os.read(r, 1)[0]
            if not self.peers_done.wait(STOP_GRACE_S):
                on_hang(signal.Signals(signum).name)

        threading.Thread(target=watch, name="stop-watch", daemon=True).start()

    @staticmethod
    def peer_failure(e: BaseException) -> bool:
        """Whether a collective raised because another process is gone (gloo: the connection
        was reset or closed; NCCL: a distributed backend error)."""
        import re
        return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and re.search(
            r"gloo|nccl|connection (reset|closed|refused)|broken pipe", str(e), re.IGNORECASE) is not None)

    @staticmethod
    def hard_stop(log, message: str) -> None:
        """Ends the process at once from any thread (the main one may be blocked in a
        collective): `message` as the log's last line and on stderr, exit code 2."""
        print(message, file=sys.stderr, flush=True)
        if log is not None and log.path is not None:
            with contextlib.suppress(Exception):
                log(message, console=False)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(2)

    @staticmethod
    def last_line(log, message: str, code: int) -> None:
        """Ends the run: `message` as the log's last line (when one is open) and on stderr."""
        print(message, file=sys.stderr, flush=True)
        if log is not None and log.path is not None:
            try:
                log(message, console=False)
            except ConfigError:
                pass  # the log itself failed; stderr has the message
        sys.exit(code)


class TrainClock:
    """The run's training time in ms. It stops inside paused() (validation, checkpoints),
    which waits for the GPU on entry and on exit so that only training steps are timed."""

    def __init__(self, sync, ms: float = 0.0):
        self.sync, self.ms = sync, ms
        self.sync()
        self.t0 = time.perf_counter()

    def elapsed_ms(self) -> float:
        return self.ms + 1000 * (time.perf_counter() - self.t0)

    @contextlib.contextmanager
    def paused(self):
        self.sync()
        self.ms = self.elapsed_ms()
        yield
        self.sync()
        self.t0 = time.perf_counter()


class Trainer:
    """One run: the model, its compiled form, the optimizers and the training stream; the
    steps, the warm-up and the timed loop."""

    def __init__(self, args: Hyperparameters, rank: int, world_size: int, plan, log: Logger,
                 stop: RunStop | None = None):
        """plan: the run's RunPlan, or a device, for which resolve_plan makes it here (proving
        and timing its fast paths, and logging its table); stop: main()'s RunStop."""
        self.stop = stop or RunStop()
        if not isinstance(plan, RunPlan):
            plan = resolve_plan(args, plan, rank, world_size, log)
        self.args, self.rank, self.world_size, self.log = args, rank, world_size, log
        self.plan, self.device = plan, plan.device
        self.grad_accum = plan.grad_accum
        torch.manual_seed(args.seed)
        self.model = build_model(args, plan)
        if world_size > 1:  # every rank starts from rank 0's initialization
            for p in self.model.parameters():
                dist.broadcast(p.detach(), 0)
        if plan.compile:
            torch._dynamo.config.cache_size_limit = 64
        self.forward = torch.compile(self.model, dynamic=False, fullgraph=True) if plan.compile else self.model
        self.opt = Optimizers(self.model, args, rank, world_size, plan=plan)
        self.split = split_step(args)
        self.batches: TrainBatches | None = None
        self.step = None  # the step being run (for the interrupt message)
        self.last_checkpoint = Path(args.resume).resolve() if args.resume else None  # the one to resume from
        self.tokens_before = schedule_tokens(args)  # for the ETA

    def restart_data(self, step: int = 0, position=None):
        """A fresh training stream for `step` (its first shard starts loading now): from the
        start of the data, or from a checkpoint's position."""
        a = self.args
        self.batches = train_data_generator(a.train_files, batch_size_at(step, a), self.rank, self.world_size,
                                            a.train_max_seq_len, self.device, a.vocab_size, position)

    def next_batches(self, batch_size: int):
        """This process's micro-batches of the next step, at `batch_size`."""
        return self.batches.at(batch_size)

    # --- one optimization step ---
    def train_step(self, step: int, around_optimizer=contextlib.nullcontext) -> Tensor:
        """One optimization step; around_optimizer(): a context entered around the optimizer
        step (tools/preflight.py counts its operations there)."""
        args = self.args
        self.model.set_windows(*windows_at(step, args))
        # through pinned memory: a plain torch.tensor(..., device=cuda) would wait for the GPU
        # to finish the previous step (a blocking copy), leaving it idle while data is prepared
        weights, = _to_device((torch.tensor(mtp_weights(step, args)),), self.device)
        adam_step = step % 2 == 1
        batches = self.next_batches(batch_size_at(step, args))
        total = torch.zeros((), device=self.device)
        for j, (inputs, targets, cu_seqlens) in enumerate(batches):
            with self.opt.micro_batch(last=j == len(batches) - 1, adam_step=adam_step):
                loss = self.forward(inputs, targets, cu_seqlens, args.train_max_seq_len, weights)
                (loss / self.grad_accum).backward()
            total += loss.detach()
        with around_optimizer():
            self.opt.step(lr_multiplier(step, args), muon_momentum(step, args), adam_step)
        if step == self.split:
            self.model.split_embed()
            self.opt.split_embed()
        # summed multi-token loss per token, averaged over this rank's micro-batches
        return total / (len(batches) * batches[0][0].numel())

    def validate(self, max_steps: int | None = None) -> float:
        return evaluate(self.forward, self.model, self.args, self.rank, self.world_size, self.device, max_steps)

    def sync(self):
        self.plan.sync()

    # --- warm-up and exact reset ---
    def warmup(self):
        """Runs every shape the timed run will see (steps 0, 1, 2 and each transition +-1,
        validation with each window), then restores the initial state exactly: parameters,
        optimizer state (which also drops every gradient) and schedule state."""
        args = self.args
        t0 = time.perf_counter()
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_state = self.opt.state_dict()  # copies already
        self.restart_data()
        seen_windows = set()
        for step in warmup_steps(args):
            self.train_step(step)
            if self.model.windows not in seen_windows:
                seen_windows.add(self.model.windows)
                self.validate(max_steps=1)
        self.model.set_windows(*final_windows(args), yarn=False)
        self.validate(max_steps=1)
        self.sync()
        self.model.load_state_dict(model_state)
        self.model.reset_schedule_state()
        self.opt.load_state_dict(opt_state)
        self.log(f"warm-up ({len(warmup_steps(args))} steps + validation) took {time.perf_counter() - t0:.1f}s; "
                 f"state reset")

    # --- checkpoints (files section: write_checkpoint, restore_checkpoint) ---
    def checkpoint(self, step: int, train_ms: float, run_id: str) -> Path | None:
        path = write_checkpoint(Path(self.args.log_dir).resolve(), run_id, step, train_ms, self.model, self.opt,
                                self.batches.position(), self.rank, self.world_size, self.plan, self.stop)
        if path is not None:
            self.last_checkpoint = path
        return path

    def resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint to resume from" + ("" if self.args.checkpoint_every else " (--checkpoint_every=0)")
        return f"resume with --resume={self.last_checkpoint}"


def train(t: Trainer, run_id: str = "run", resume: dict | None = None) -> float | None:
    """Steps from the start (or the checkpoint `resume`) to the end with validations
    and checkpoints in between; returns the final validation loss."""
    args, log, N = t.args, t.log, total_steps(t.args)
    first, train_ms, position = (restore_checkpoint(resume, t.model, t.opt, t.rank, t.plan)
                                 if resume else (0, 0.0, None))
    t.restart_data(first, position)
    t.model.set_windows(*windows_at(min(first, N - 1), args))
    val_loss = None
    clock = TrainClock(t.sync, train_ms)
    with t.stop.loop():
        for step in range(first, N + 1):
            if step == N or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
                with clock.paused():
                    val_loss = _validate_and_log(t, step, clock.ms)
            if step == N:
                break
            t.step = step  # "at step N": N steps done, the next one in progress or not started
            loss = t.train_step(step)
            done = t.step = step + 1
            read = _log_step(t, done, loss, clock.elapsed_ms())
            stop = t.stop.agreed(t.world_size, t.device, read, t.plan.loss_every)
            if args.checkpoint_every and (done % args.checkpoint_every == 0 or done == N or stop):
                with clock.paused():
                    path = t.checkpoint(done, clock.ms, run_id)
                    if path is not None:
                        log(f"checkpoint: {path}")
            if stop:
                raise KeyboardInterrupt
    return val_loss


def _validate_and_log(t: Trainer, step: int, train_ms: float) -> float:
    """Validation at `step` (at the end: with the final windows); its log line."""
    N = total_steps(t.args)
    if step == N:
        t.model.set_windows(*final_windows(t.args), yarn=False)
    val_loss = t.validate()
    if not math.isfinite(val_loss):
        raise ConfigError(f"validation loss is {val_loss} at step {step}: training diverged")
    t.log(f"step:{step}/{N} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms"
          + (f" step_avg:{train_ms / step:.2f}ms" if step else ""))
    return val_loss


def _log_step(t: Trainer, done: int, loss: Tensor, elapsed_ms: float) -> bool:
    """The line of step `done`; its loss every RunPlan.loss_every steps (on a GPU 25: reading
    it waits for the GPU; on the CPU 1). Returns whether the loss was read."""
    N = total_steps(t.args)
    shown = ""
    read = done % t.plan.loss_every == 0 or done == N
    if read:
        if t.world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise ConfigError(f"training loss is {loss_value} at step {done - 1}: training diverged")
        shown = f" mtp_loss:{loss_value:.4f}"  # the weighted multi-token sum, per token
    avg = elapsed_ms / done
    t.log(f"step:{done}/{N}{shown} train_time:{elapsed_ms:.0f}ms step_avg:{avg:.2f}ms "
          f"eta:{eta_seconds(t.tokens_before, done, elapsed_ms):.0f}s")
    return read


# =====================================================================================
# 10. main
# =====================================================================================

def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """--device: auto is this process's GPU when CUDA is available, else the CPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda: this machine has no usable CUDA GPU (or this torch is a CPU build); "
                          "use --device=cpu or auto")
    return torch.device(setting, local_rank) if setting == "cuda" else torch.device(setting)


def cpu_threads_per_process(processes_here: int) -> int:
    """Intra-op threads for a CPU run: OMP_NUM_THREADS if set, else this machine's usable
    cores shared among its processes (more threads than cores make every step many times
    slower on a busy machine)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes_here))


def set_allocator_defaults() -> None:
    """Expandable segments for the CUDA caching allocator (the record's setting: less
    fragmentation as the batch grows), unless the user chose an allocator configuration.
    Must run before CUDA initializes, so main() does it first, not the import."""
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def main(argv=None):
    set_allocator_defaults()
    stop = RunStop()
    stop.install()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    log, trainer = None, None
    try:
        args = parse_args(argv)
        check_config(args, world_size)
        machine = Machine.of(resolve_device(args.device, local_rank))
        device = machine.device
        resume = check_resume(args, world_size) if args.resume else None
        import uuid
        # a resumed run continues its checkpoint's run and log unless --run_id names another
        resumed_id = checkpoint_run_id(resume, args.resume) if resume else None
        run_id = args.run_id or resumed_id or str(uuid.uuid4())
        continues = resume is not None and run_id == resumed_id
        data_summary = check_inputs(dataclasses.replace(args, run_id=run_id), world_size, rank, machine,
                                    continues_log=continues)  # before any process group or log
        start_process(machine, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        log_path = Path(args.log_dir).resolve() / f"{run_id}.txt"
        fresh_log = not (continues and log_path.exists())
        log = Logger(log_path if rank == 0 else None, append=not fresh_log)
        if fresh_log:
            log(Path(__file__).read_text(), console=False)
            log("=" * 100, console=False)
            log(environment_report(), console=False)
            log("=" * 100, console=False)
        log(f"run {run_id}: {world_size} process(es) x {VIRTUAL_RANKS // world_size} micro-batches on {device}"
            + ("" if machine.cuda else f" ({torch.get_num_threads()} thread(s) each)") + f"; log file {log.path}")
        if resume is not None:
            where = f"from {Path(args.resume).resolve()} at step {resume['step']}{resume_note(args, resume)}"
            log(f"resumed {where}" if continues else f"continues run {resumed_id} {where}")
        log("config: " + " ".join(f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                  for k, v in dataclasses.asdict(args).items()), console=False)
        log(data_summary)
        trainer = Trainer(args, rank, world_size, resolve_plan(args, device, rank, world_size, log, machine=machine),
                          log, stop)
        if world_size > 1:
            stop.watch(lambda signame: stop.hard_stop(log, (
                f"error: stopped by {signame}{_at_step(trainer)}, still waiting for another process "
                f"{STOP_GRACE_S:.0f}s later (a peer process stopped or hangs); {trainer.resume_hint()}")))
        warm = args.warmup and trainer.forward is not trainer.model
        if warm:
            trainer.warmup()
        train(trainer, run_id, resume)
        if args.save_model and rank == 0:
            save_model(trainer.model, args.save_model)
            log(f"saved the model to {args.save_model}")
        if machine.cuda:
            log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        else:
            import resource
            log(f"peak memory (CPU resident set): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        stop.last_line(log, f"error: {e}", 2)
    except KeyboardInterrupt:
        stop.last_line(log, f"interrupted{_at_step(trainer)}", 130)
    except Exception as e:
        if not (world_size > 1 and stop.peer_failure(e)):
            raise
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        hint = trainer.resume_hint() if trainer is not None else "no checkpoint to resume from"
        # not through the interpreter's teardown: with the peer gone, gloo's threads may still
        # be running, and destroying them there aborts the process (SIGABRT) instead of exit 2
        stop.hard_stop(log, f"error: a peer process stopped or its connection closed{_at_step(trainer)} "
                            f"({reason}); {hint}")
    finally:
        if dist.is_initialized():  # (a dead peer ended the process above: tearing down may block)
            dist.destroy_process_group()


def _at_step(trainer) -> str:
    return f" at step {trainer.step}" if trainer is not None and trainer.step is not None else " before training"


if __name__ == "__main__":
    main()
