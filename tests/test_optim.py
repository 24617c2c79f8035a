"""Tests of the optimizers (train_gpt.py section 3) and the symmetric matmuls (section 2a).

Every expectation comes from an independent reference written here from ALGORITHM.md section 3
(naive loops in float64, SVD polar factors), never from the code's own output.
"""
import contextlib
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import train_gpt as tg

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # one intra-op thread: OpenMP threads spin pathologically (10x slower LAPACK) on a busy
    # 2-core machine, and the small matrices here gain nothing from more
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ---- reference hyperparameters, transcribed from ALGORITHM.md 3 ---------------------
PE_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
REF_ADAM = {  # label: (beta1, beta2, lr_mul, wd_mul)
    "lm_head": (0.5, 0.95, 1, 150),
    "embed": (0.5, 0.95, 1, 150),
    "value_embed": (0.75, 0.95, 75, 5),
    "attn_gate_bank": (0.9, 0.99, 1, 1),
    "ve_gate_bank": (0.9, 0.99, 1, 1),
    "smear_gate": (0.9, 0.99, 0.01, 0),
    "skip_gate": (0.9, 0.99, 0.05, 0),
    "scalars": (0.9, 0.99, 5, 0),
    "x0_lambda": (0.65, 0.95, 5, 0),
}
REF_MUON_LR_MUL = {"attn": 1, "mlp_fc": 1, "mlp_proj": 2}
MUON_LR, MUON_WD, MUON_B2 = 0.023, 1.2, 0.95
ADAM_LR, ADAM_EPS, ADAM_WD = 0.008, 1e-10, 0.005

# ---- a small model with every label (d = 16) ------------------------------------------
D, V, H_BIG = 16, 64, 9  # attn_gate_bank (10, 9, 12) has 1080 >= 1024 elements, dim 0 = 10


class FakeModel(nn.Module):
    def __init__(self, seed=0, adam_dtype=torch.bfloat16):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def param(shape, label, dtype=torch.bfloat16, scale=0.5):
            p = nn.Parameter((torch.randn(shape, generator=gen) * scale).to(dtype))
            p.label = label
            return p

        a = adam_dtype
        self.lm_head = param((V, D), "lm_head", a)
        self.embed = param((V, D), "embed", a)
        self.value_embeds = nn.ParameterList([param((V, D), "value_embed", a) for _ in range(3)])
        self.attn_gate_bank = param((10, H_BIG, 12), "attn_gate_bank", a)
        self.ve_gate_bank = param((5, 2, 12), "ve_gate_bank", a)
        # tiny values: their lr_mul (0.01, 0.05) makes steps below a bf16 ulp of 0.5
        self.smear_gate = param((1, 12), "smear_gate", a, scale=1e-3)
        self.skip_gate = param((1, 12), "skip_gate", a, scale=1e-3)
        self.scalars = param((36,), "scalars", torch.float32)
        self.x0_lambda = param((11,), "x0_lambda", torch.float32)
        self.attn = nn.ParameterList([param((4 * D, D), "attn") for _ in range(10)])
        self.mlp_fc = nn.ParameterList([param((4 * D, D), "mlp_fc") for _ in range(11)])
        self.mlp_proj = nn.ParameterList([param((4 * D, D), "mlp_proj") for _ in range(11)])


def muon_names(model):
    return [n for n, p in model.named_parameters() if p.label in REF_MUON_LR_MUL]


def adam_names(model):
    return [n for n, p in model.named_parameters() if p.label in REF_ADAM]


def random_grads(model, seed, names=None):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen).to(p.dtype)
            for n, p in model.named_parameters() if names is None or n in names}


def set_grads(model, grads, accumulate=False):
    for n, p in model.named_parameters():
        if n in grads:
            if accumulate and p.grad is not None:
                p.grad += grads[n]
            else:
                p.grad = grads[n].clone()


def master_weights(opt):
    """fp32 master weight of every Muon matrix, rebuilt from bf16 bits + mantissa with numpy."""
    out = {}
    for g in opt.muon.groups:
        for j, i in enumerate(g.mine):
            p = opt.muon.params[i]
            hi = p.detach().view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16
            lo = g.mantissa[j].view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
            out[id(p)] = torch.from_numpy((hi | lo).view(np.float32).copy())
    return out


# ---- independent references -------------------------------------------------------------
def ref_polar_express(G):
    X = G / (torch.linalg.norm(G) * 1.02 + 1e-6)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for a, b, c in PE_COEFFS:
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


class RefMuon:
    """One NorMuon matrix, float64, straight from ALGORITHM.md 3.1-3.5. The variance
    normalization (3.4) treats each unit on its own: attention's Q, K, V, O blocks, or the
    whole MLP matrix; each unit keeps its own Frobenius norm."""

    def __init__(self, p, label):
        self.p = p.detach().double().clone()
        self.label = label
        self.m = torch.zeros_like(self.p)
        rows, cols = self.p.shape
        self.units = 4 if label == "attn" else 1
        r = rows // self.units
        self.s = [torch.zeros(r, 1, dtype=torch.float64) if r >= cols else torch.zeros(1, cols, dtype=torch.float64)
                  for _ in range(self.units)]

    def step(self, g, lr, mu, wd=MUON_WD, beta2=MUON_B2):
        g = g.double()
        self.m = self.m + (1 - mu) * (g - self.m)
        u = g + mu * (self.m - g)
        rows, cols = u.shape
        r = rows // self.units
        normalized = []
        for k in range(self.units):
            o = ref_polar_express(u[k * r:(k + 1) * r])
            v = (o ** 2).mean(dim=1, keepdim=True) if r >= cols else (o ** 2).mean(dim=0, keepdim=True)
            self.s[k] = self.s[k] + (1 - beta2) * (v - self.s[k])
            o2 = o / torch.sqrt(torch.clamp(self.s[k], min=1e-10))
            normalized.append(o2 * (torch.linalg.norm(o) / torch.linalg.norm(o2)))
        o2 = torch.cat(normalized)
        lr_p = lr * math.sqrt(max(1.0, rows / cols)) * REF_MUON_LR_MUL[self.label]
        mask = (o2 * self.p >= 0).double()
        self.p = self.p - lr_p * o2 - lr_p * (wd * lr) * self.p * mask


class RefAdam:
    """One Adam tensor, float64; the parameter is stored in `dtype` (rounded) after each step."""

    def __init__(self, p, label, wd=ADAM_WD):
        self.p = p.detach().double().clone()
        self.dtype = p.dtype
        self.b1, self.b2, self.lr_mul, self.wd_mul = REF_ADAM[label]
        self.m = torch.zeros_like(self.p)
        self.v = torch.zeros_like(self.p)
        self.t = 0
        self.wd = wd

    def step(self, g, lr):
        g = g.double()
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        lr_p = lr * self.lr_mul
        upd = lr_p * math.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t) * self.m / (self.v.sqrt() + ADAM_EPS)
        upd = upd + lr_p ** 2 * self.wd * self.wd_mul * self.p * (upd * self.p > 0).double()
        self.p = (self.p - upd).to(self.dtype).double()


def make_opt(model, rank=0, world_size=1, **kw):
    return tg.Optimizers(model, tg.Hyperparameters(), rank, world_size, **kw)


# ---- Polar Express -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072)])
def test_polar_express_matches_svd_polar_factor(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    O = tg.polar_express(G).double()
    assert O.shape == G.shape
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    s = torch.linalg.svdvals(O)
    assert 0.8 <= s.min().item() and s.max().item() <= 1.2, (s.min().item(), s.max().item())
    assert (torch.linalg.norm(O - polar) / torch.linalg.norm(polar)).item() < 0.15


def test_polar_express_bf16_and_batched():
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(3, 48, 160, generator=gen)
    G[1] *= 1e3  # the batch is normalized per matrix
    O = tg.polar_express(G.bfloat16())
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    for k in range(3):
        U, _, Vh = torch.linalg.svd(G[k].double(), full_matrices=False)
        polar = U @ Vh
        err = torch.linalg.norm(O[k].double() - polar) / torch.linalg.norm(polar)
        assert err.item() < 0.2
        s = torch.linalg.svdvals(O[k].double())
        assert 0.7 <= s.min().item() and s.max().item() <= 1.3
    # 2-D input gives the same result as a batch of one
    O2 = tg.polar_express(G[0])
    assert torch.allclose(O2, tg.polar_express(G[:1])[0])


def test_attention_update_is_orthogonalized_as_four_blocks():
    d = 64
    gen = torch.Generator().manual_seed(3)
    blocks = []
    for scale in (1.0, 1e-3, 1e2, 1e-1):  # very different block scales
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        R, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        s = torch.linspace(0.5, 1.0, d, dtype=torch.float64)
        blocks.append(scale * Q @ torch.diag(s) @ R)
    u = torch.cat(blocks).float().unsqueeze(0)  # (1, 4d, d)
    o = tg.orthogonalize_update(u, attn=True)[0].double()
    for k in range(4):
        sv = torch.linalg.svdvals(o[k * d:(k + 1) * d])
        assert 0.8 <= sv.min().item() and sv.max().item() <= 1.2, (k, sv.min().item(), sv.max().item())
    # orthogonalizing the whole (4d, d) matrix instead would leave the small blocks tiny
    whole = tg.orthogonalize_update(u, attn=False)[0].double()
    assert torch.linalg.svdvals(whole[d:2 * d]).max().item() < 0.1


# ---- Triton kernels (interpreter, in a subprocess) ---------------------------------------
def _interpreter_broken_by_numpy() -> str:
    """Why the interpreter cannot run here ("" if it can). Triton 3.6's interpreter turns a
    runtime int loop bound into a 1-element array and calls int() on it, which NumPy 2.4
    refuses (checked: Triton 3.6 + NumPy 2.4.6 fails, + NumPy 2.3 passes; Triton 3.7, 3.8
    and 3.9 + NumPy 2.4.6 pass). Compiled kernels are unaffected."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        return ""
    major_minor = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if major_minor(triton_version) < (3, 7) and major_minor(np.__version__) >= (2, 4):
        return f"Triton {triton_version}'s interpreter fails with NumPy {np.__version__} (use numpy<2.4)"
    return ""


INTERPRETER_BROKEN = _interpreter_broken_by_numpy()


def run_interpreted(script: str) -> str:
    """Runs a check script of tools/ under the Triton interpreter; returns its output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, os.path.join(HERE, "..", "tools", script)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.skipif(bool(INTERPRETER_BROKEN), reason=INTERPRETER_BROKEN)
def test_triton_sym_kernels_under_interpreter():
    run_interpreted("sym_kernels_check.py")


# ---- sm90 compiles (no GPU): tools/kernel_report.py, with a launch's specializations ----------
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
import kernel_report  # noqa: E402

def sm90(family: str):
    """Every config of a kernel family compiled for sm90 at the record's shapes, with the
    specializations a GPU launch gives them (skips where Triton cannot compile for CUDA)."""
    why = kernel_report.can_compile()
    if why:
        pytest.skip(f"no sm90 compile here: {why}")
    figs = kernel_report.family_figures(family)
    for f in figs:
        assert f.shared <= kernel_report.H100["shared_per_block"], f"{family} [{f.config}]: {f.shared} B shared"
        assert f.spilled <= kernel_report.SPILL_ALLOWED, f"{family} [{f.config}]: {f.spilled} B spilled"
    return figs


def test_blocks_per_sm_by_hand():
    """H100 occupancy from registers, shared memory and warps, against hand-computed cases."""
    # 128 regs x 32 lanes = 4096 per warp: 16 warps fit 64K; 8-warp blocks: 2 (shared would allow 3)
    assert kernel_report.blocks_per_sm(128, 64 * 1024, 8) == (2, "registers")
    # 255 regs round up to 256 x 32 = 8192 per warp: 8 warps, 2 blocks of 4
    assert kernel_report.blocks_per_sm(255, 16 * 1024, 4) == (2, "registers")
    # 64 regs: 32 warps by registers; 144 KB + 1 KB reserved of 228 KB: 1 block
    assert kernel_report.blocks_per_sm(64, 144 * 1024, 4) == (1, "shared")
    # tiny blocks: 32 blocks per SM at most
    assert kernel_report.blocks_per_sm(16, 0, 1) == (32, "blocks")


def test_sfu_counts_inside_and_outside_loops_of_handwritten_ptx():
    ptx = "\n".join([
        "\tex2.approx.f32 %f1, %f2;",  # before the loop
        "$L__BB0_1:",
        "\tmul.f32 %f3, %f1, %f1;",
        "\t@%p1 ex2.approx.ftz.f32 %f4, %f3;",
        "\tdiv.full.f32 %f5, %f4, %f3;",
        "\tsqrt.rn.f32 %f6, %f5;",
        "\t@%p2 bra $L__BB0_1;",
        "\tlg2.approx.f32 %f7, %f6;",  # after it
        "\tdiv.s32 %r1, %r2, %r3;",  # integer: not a special function
        "\tbra.uni $L__BB0_3;",
        "$L__BB0_3:",  # a forward branch is no loop
        "\trcp.rn.f32 %f8, %f7;",
    ])
    assert kernel_report.sfu_counts(ptx) == (3, 3)


@pytest.fixture(scope="module")
def exp_sqrt_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rows_exp_sqrt(X, Y, N, BLOCK: tl.constexpr):
        """Y[r] = sqrt(sum_n exp(X[r, n]) + sqrt(X[r, n])), one row r per program."""
        r = tl.program_id(0).to(tl.int64)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK):
            x = tl.load(X + r * N + n0 + tl.arange(0, BLOCK))
            acc += tl.exp(x) + tl.sqrt(x)
        tl.store(Y + r, tl.sqrt(tl.sum(acc)))
    return rows_exp_sqrt


def test_kernel_report_counts_a_small_kernel(exp_sqrt_kernel):
    """The report's figures of a kernel written for this test: per element 2 special functions
    in the loop (exp, sqrt) plus 1 sqrt per row of N = 4096 (outside it), no spills, plain
    (not asynchronous) loads, one loop trip's BLOCK fp32 loads per block in flight."""
    why = kernel_report.can_compile()
    if why:
        pytest.skip(f"no sm90 compile here: {why}")
    N, BLOCK, warps = 4096, 512, 4
    launch = kernel_report.Launch("test", exp_sqrt_kernel, [(dict(BLOCK=BLOCK), warps, 3)],
                                  dict(X="*fp32", Y="*fp32", N="i32"), dict(N=N),
                                  elements=lambda m: N, trips=lambda m: N // m["BLOCK"], loads=lambda m: 4 * m["BLOCK"])
    consts, divisible = launch.specialized()
    assert consts == {} and set(divisible) == {"X", "Y", "N"}
    f = kernel_report.figures_of(launch, dict(BLOCK=BLOCK), warps, 3)
    threads = 32 * warps
    # the last sqrt runs once per thread (on a scalar): it adds threads / N per element
    assert f.sfu_per_element == pytest.approx(2 + threads / N, abs=1e-9), f.ptx.count("ex2")
    assert 0 < f.regs <= 255 and f.spilled == 0 and not f.pipelined
    assert f.blocks == kernel_report.blocks_per_sm(f.regs, f.shared, warps)[0]
    assert f.in_flight == f.blocks * 4 * BLOCK


def test_triton_sym_kernels_compile_for_hopper():
    """No GPU needed: Triton compiles each autotune config of both symmetric kernels, for bf16
    (the record's Polar Express dtype), to sm90 machine code at NorMuon's shapes with a
    launch's specializations. The interpreter test above does not catch code that only the
    real compiler rejects; here the PTX must also use Hopper's warpgroup tensor-core
    instructions (wgmma), the main loop must be pipelined (cp.async) and nothing may spill."""
    for family in ("symmetric X X^T", "symmetric b A + c A A"):
        figs = sm90(family)
        assert len(figs) == len(tg._xxt_kernel.configs) >= 2
        for f in figs:
            assert "wgmma.mma_async" in f.ptx, f"{family} [{f.config}]: no wgmma in the PTX"
            assert f.pipelined, f"{family} [{f.config}]: main loop not pipelined"


@pytest.mark.skipif(bool(INTERPRETER_BROKEN), reason=INTERPRETER_BROKEN)
def test_fused_kernels_under_interpreter():
    """The fused kernels under the interpreter at small shapes (tools/fused_kernels_check.py).
    Loss head (kernels 2d): against a float64 reference and the unfused FP8 head, the loss,
    the e5m2 gradient (rounded once), grad_x and grad_w, for K = 3, 2, 1, grad_accum 8 and
    1, an incoming gradient other than the one the forward was told, repeated targets and
    the last K-1 positions. MLP (kernels 2e): against float64 autograd of relu(x @ c_fc^T)^2
    @ c_proj and the unfused bf16 MLP, the activation, output, grad_x and the gradients of
    c_fc and c_proj, with all-negative pre-activations."""
    out = run_interpreted("fused_kernels_check.py")
    # loss head: 5 cases x (10 checks in one pass + 7 in two passes); MLP: 2 cases x 6
    assert out.count("[PASS]") == 5 * (10 + 7) + 2 * 6 and "[FAIL]" not in out, out


def test_fused_loss_kernel_compiles_for_hopper():
    """Every config of the loss kernel compiles to sm90 code at the record's stage-3 shapes,
    given the one-pass matmul's sigmoids and sums or not (two passes): its e5m2 stores round
    to nearest (cvt.rn), nothing spills, every config holds 2+ blocks per SM, and with the
    one-pass matmul's sigmoids it spends 1 special-function op per (T, V) element (the exp
    of the softmax), 6 in two passes (a sigmoid's exp and division and an exp, twice)."""
    for family, sfu in (("loss kernel (one pass)", 1.0), ("loss kernel (two passes)", 6.0)):
        figs = sm90(family)
        assert len(figs) >= 2
        for f in figs:
            assert "cvt.rn.satfinite.e5m2x2.f32" in f.ptx, f"{family} [{f.config}]"
            assert f.blocks >= 2, f"{family} [{f.config}]: {f.blocks} block(s) per SM"
            assert f.sfu_per_element == pytest.approx(sfu, abs=0.06), f"{family} [{f.config}]"


def test_fp8_logits_kernel_compiles_for_hopper():
    """Every autotune config of the one-pass head's FP8 matmul compiles for sm90 at the
    record's shapes: e4m3 wgmma, a pipelined main loop, the sigmoids rounded to fp16 to
    nearest (cvt.rn), no spills; one config holds 2 blocks per SM (its epilogue overlaps
    another block's main loop); and the one-pass head, this epilogue and the loss kernel
    together, spends at most 4 special-function ops per (T, V) element."""
    figs = sm90("one-pass FP8 matmul")
    assert len(figs) >= 2
    for f in figs:
        assert "wgmma.mma_async" in f.ptx and "e4m3.e4m3" in f.ptx, f"[{f.config}]: no e4m3 wgmma in the PTX"
        assert "cvt.rn.f16.f32" in f.ptx, f"[{f.config}]: no round-to-nearest fp16 conversion"
        assert f.pipelined, f"[{f.config}]: main loop not pipelined"
    assert max(f.blocks for f in figs) >= 2
    loss = sm90("loss kernel (one pass)")
    assert max(f.sfu_per_element for f in figs) + max(f.sfu_per_element for f in loss) <= 4.0 + 1e-9


def test_fused_mlp_kernel_compiles_for_hopper():
    """Every autotune config of the MLP matmul, forward and backward (tuned apart), compiles
    for sm90 with bf16 operands at the record's shapes: wgmma, a pipelined main loop, no
    spills; the backward's epilogue takes one sqrt per element, the forward's none."""
    for family, sfu, kernel in (("MLP matmul, forward", 0.0, tg._mlp_fwd_kernel),
                                ("MLP matmul, backward", 1.0, tg._mlp_bwd_kernel)):
        figs = sm90(family)
        assert len(figs) == len(kernel.configs) >= 2
        for f in figs:
            assert "wgmma.mma_async" in f.ptx, f"{family} [{f.config}]: no wgmma in the PTX"
            assert f.pipelined, f"{family} [{f.config}]: main loop not pipelined"
            assert f.sfu_per_element == pytest.approx(sfu, abs=0.02), f"{family} [{f.config}]"
    assert tg._mlp_fwd_kernel is not tg._mlp_bwd_kernel


def test_sym_matmul_torch_fallback():
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(tg.sym_xxt(A), torch.einsum("bik,bjk->bij", A, A))
    S = tg.sym_xxt(A)
    ref = 0.3 * S + -1.7 * torch.einsum("bik,bkj->bij", S, S)
    torch.testing.assert_close(tg.sym_ba_plus_caa(S, 0.3, -1.7), ref)
    torch.testing.assert_close(tg.sym_ba_plus_caa(S[0], 0.3, -1.7), ref[0])


# ---- mantissa ----------------------------------------------------------------------------
def test_mantissa_reconstructs_fp32_master_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    master = torch.randn(4096, generator=gen)
    p = torch.empty(4096, dtype=torch.bfloat16)
    mant = torch.empty(4096, dtype=torch.uint16)
    tg.split_fp32_to_bf16_and_mantissa(master.clone(), p, mant)
    for it in range(200):
        upd = torch.randn(4096, generator=gen) * 10.0 ** (-1 - it % 6)
        cur = tg.fp32_from_bf16_and_mantissa(p, mant)
        tg.split_fp32_to_bf16_and_mantissa(cur - upd - 0.01 * cur, p, mant)
        master = master - upd - 0.01 * master
    bits = master.numpy().view(np.uint32)
    assert np.array_equal(p.view(torch.int16).numpy().view(np.uint16), (bits >> 16).astype(np.uint16))
    assert np.array_equal(mant.view(torch.int16).numpy().view(np.uint16), (bits & 0xFFFF).astype(np.uint16))
    # the bf16 parameter is the truncated master (not rounded), so |p| <= |master|
    assert torch.all(p.float().abs() <= master.abs())


# ---- NorMuon vs reference ---------------------------------------------------------------
def test_normuon_two_steps_match_reference():
    torch.manual_seed(0)
    model = FakeModel()
    opt = make_opt(model)
    names = muon_names(model)
    params = dict(model.named_parameters())
    refs = {n: RefMuon(params[n], params[n].label) for n in names}
    for step, (lr_mult, mu) in enumerate([(1.0, 0.85), (1.52, 0.9), (0.4, 0.95)]):
        grads = random_grads(model, 100 + step, names)
        set_grads(model, grads)
        opt.step(lr_mult, mu, adam_step=False)
        for n in names:
            refs[n].step(grads[n], MUON_LR * lr_mult, mu)
            assert params[n].grad is None
    masters = master_weights(opt)
    for n in names:
        p = params[n]
        got = masters[id(p)].double()
        torch.testing.assert_close(got, refs[n].p, rtol=0, atol=2e-5, msg=n)
        # the bf16 parameter is the top half of the master
        assert torch.equal(p.detach(), got.float().view(torch.int32).bitwise_and(-65536).view(torch.float32).bfloat16())
    # the updates are far larger than the tolerance
    init = dict(FakeModel().named_parameters())
    assert min((refs[n].p - init[n].double()).abs().max().item() for n in names) > 1e-2


def test_normuon_wide_matrix_uses_per_column_second_moment():
    gen = torch.Generator().manual_seed(6)
    p = nn.Parameter(torch.randn(16, 64, generator=gen).bfloat16())
    muon = tg.NorMuon([p], ["mlp_fc"], weight_decay=MUON_WD, beta2=MUON_B2)
    assert muon.groups[0].second_moment.shape == (1, 1, 1, 64)  # (n, units, 1, cols)
    ref = RefMuon(p, "mlp_fc")
    for step in range(2):
        g = torch.randn(16, 64, generator=gen).bfloat16()
        p.grad = g.clone()
        muon.step(0.02, 0.9)
        ref.step(g, 0.02, 0.9)
    got = tg.fp32_from_bf16_and_mantissa(p.detach(), muon.groups[0].mantissa[0]).double()
    torch.testing.assert_close(got, ref.p, rtol=0, atol=2e-5)


def ref_normuon_unit(o, s, beta2):
    """ALGORITHM.md 3.4 for one unit (rows >= cols: per row), float64: v = mean of squares per row,
    s = lerp(s, v, 1 - beta2), r = rsqrt(max(s, 1e-10)),
    scale = r * sqrt(sum(v) * n) / sqrt(sum(v * n * r^2)). Returns (o * scale, new s)."""
    o, s = o.double(), s.double()
    n = o.shape[1]
    v = (o * o).mean(dim=1, keepdim=True)
    s = s + (1 - beta2) * (v - s)
    r = 1 / torch.sqrt(torch.clamp(s, min=1e-10))
    scale = r * torch.sqrt(v.sum() * n) / torch.sqrt((v * n * r * r).sum())
    return o * scale, s


def test_normuon_normalizes_each_attention_block_on_its_own():
    """ALGORITHM.md 3.4: for attention the unit is each d x d block (Q, K, V, O): every block keeps
    its own Frobenius norm (to bf16 rounding), the result agrees with a float64 reference to
    bf16 tolerance and is bf16; keeping the whole (4d, d) norm would move the blocks apart.
    For an MLP matrix the unit is the whole matrix."""
    gen = torch.Generator().manual_seed(7)
    d = 32
    # an orthogonalized-like bf16 update, and second moments that differ between blocks (as
    # after earlier steps with differently scaled gradients)
    o = torch.randn(1, 4 * d, d, generator=gen).bfloat16()
    s = torch.rand(1, 4, d, 1, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1) * 1e-2
    s_before = s.clone()
    got = tg.normuon_scale_(o.clone().view(1, 4, d, d), s, MUON_B2).view(4 * d, d)
    assert got.dtype == torch.bfloat16
    whole_norms = []
    for k in range(4):
        block = o[0, k * d:(k + 1) * d]
        exp, exp_s = ref_normuon_unit(block, s_before[0, k], MUON_B2)
        torch.testing.assert_close(s[0, k].double(), exp_s, rtol=1e-6, atol=0)
        torch.testing.assert_close(got[k * d:(k + 1) * d].double(), exp, rtol=2 ** -7, atol=1e-6)
        before, after = torch.linalg.norm(block.double()), torch.linalg.norm(got[k * d:(k + 1) * d].double())
        assert abs(after / before - 1) < 2 ** -7, (k, before.item(), after.item())
        whole_norms.append(torch.linalg.norm((block.double() / s_before[0, k].double().sqrt())))
    # the whole-matrix rule would scale all four blocks by one factor: their norms would differ
    whole = torch.stack(whole_norms) * torch.linalg.norm(o.double()) / torch.linalg.norm(torch.stack(whole_norms))
    assert (whole / torch.linalg.norm(o.double().view(4, d, d), dim=(1, 2)) - 1).abs().max() > 0.2
    # MLP: one unit, the whole (4d, d) matrix
    s_mlp = torch.rand(1, 1, 4 * d, 1, generator=gen) * 1e-2
    exp, _ = ref_normuon_unit(o[0], s_mlp[0, 0].clone(), MUON_B2)
    got = tg.normuon_scale_(o.clone().view(1, 1, 4 * d, d), s_mlp, MUON_B2).view(4 * d, d)
    torch.testing.assert_close(got.double(), exp, rtol=2 ** -7, atol=1e-6)


def test_normuon_attention_step_keeps_block_norms_of_the_orthogonalized_update():
    """A whole NorMuon step on a random (4d, d) attention gradient, bf16 Polar Express as on
    GPU, no weight decay: the update's four blocks have the norms of the four separately
    orthogonalized blocks (to bf16 rounding)."""
    gen = torch.Generator().manual_seed(8)
    d = 32
    p = nn.Parameter(torch.zeros(4 * d, d, dtype=torch.bfloat16))
    grad = torch.randn(4 * d, d, generator=gen) * torch.tensor([1.0, 5.0, 0.2, 2.0]).repeat_interleave(d)[:, None]
    muon = tg.NorMuon([p], ["attn"], weight_decay=0.0, beta2=MUON_B2, ortho_dtype=torch.bfloat16)
    p.grad = grad.bfloat16()
    lr, mu = 0.02, 0.9
    muon.step(lr, mu)
    master = tg.fp32_from_bf16_and_mantissa(p.detach(), muon.groups[0].mantissa[0]).double()
    u = -master / (lr * math.sqrt(4))  # lr_p = lr * max(1, 4d/d)^0.5
    nesterov = (grad.bfloat16().float() * (1 - mu)).lerp(grad.bfloat16().float(), 1 - mu)  # lerp(g, m, mu), m = (1-mu) g
    for k in range(4):
        ortho = tg.polar_express(nesterov[k * d:(k + 1) * d].bfloat16()).double()
        got = torch.linalg.norm(u[k * d:(k + 1) * d])
        assert abs(got / torch.linalg.norm(ortho) - 1) < 2 ** -6, k


def test_polar_express_follows_the_record_rounding_order():
    """ALGORITHM.md 3.3 in bf16, written out: cast to bf16, transpose a tall matrix, norm / scale /
    divide as bf16 tensor ops, then per iteration A = X X^T, B = b A + c A A (on CPU one
    baddbmm stands in for the Triton kernel, both rounding once), and X = a X + B X fused
    (attention blocks) or split `C = B @ X; C.add_(X, alpha=a)` (MLP matrices: one op,
    rounded once). The MLP form is also shown to differ from `C += a * X`, which rounds
    a * X to bf16 before the add, so the test tells the two apart."""
    gen = torch.Generator().manual_seed(9)
    for shape, split in [((4, 32, 32), False), ((2, 128, 32), True)]:
        G = torch.randn(shape, generator=gen)
        X = G.bfloat16()
        tall = X.size(-2) > X.size(-1)
        if tall:
            X = X.mT
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
        assert X.dtype == torch.bfloat16
        for a, b, c in PE_COEFFS:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            if split:  # the record's C.add_(X, alpha=a) on CUDA: C + a*X in fp32 (its opmath), rounded once
                X = (torch.bmm(B, X).float() + torch.tensor(a) * X.float()).bfloat16()
            else:
                X = torch.baddbmm(X, B, X, beta=a)
        exp = X.mT if tall else X
        got = tg.polar_express(G.bfloat16(), split=split)
        assert got.dtype == torch.bfloat16 and torch.equal(got, exp), shape
        if split:  # the two-rounding form gives another update
            X = G.bfloat16().mT
            X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
            for a, b, c in PE_COEFFS:
                B = torch.baddbmm(*(torch.bmm(X, X.mT),) * 3, beta=b, alpha=c)
                C = torch.bmm(B, X)
                C += a * X
                X = C
            rel = ((X.mT.float() - got.float()).norm() / got.float().norm()).item()
            assert rel > 1e-3, rel
    # the qkvo stack goes through the fused form block by block, MLP matrices through the split one
    G = torch.randn(2, 128, 32, generator=gen).bfloat16()
    assert torch.equal(tg.orthogonalize_update(G, attn=True),
                       tg.polar_express(G.view(8, 32, 32)).view(2, 128, 32))
    assert torch.equal(tg.orthogonalize_update(G, attn=False), tg.polar_express(G, split=True))


def test_adam_moment_is_mul_then_add_and_scalars_are_python_floats():
    """ALGORITHM.md 3.8, record arithmetic in fp32: m.mul_(b1).add_(g, alpha=1-b1) (a lerp
    rounds differently), v.mul_(b2).addcmul_(g, g, value=1-b2), upd = m / (sqrt(v) + eps)
    * step_size with step_size a Python float, cautious decay with a Python-float factor."""
    gen = torch.Generator().manual_seed(10)
    p = nn.Parameter(torch.randn(64, 48, generator=gen))
    p.label = "value_embed"
    b1, b2, lr_mul, wd_mul = REF_ADAM["value_embed"]
    adam = tg.DistAdam([p], ["value_embed"], eps=ADAM_EPS, weight_decay=ADAM_WD)
    m, v, w = torch.zeros(64, 48), torch.zeros(64, 48), p.detach().clone()
    lerped = torch.zeros(64, 48)
    for t, lr in [(1, 0.008), (2, 0.008 * 1.52)]:
        g = torch.randn(64, 48, generator=gen)
        p.grad = g.clone()
        with torch.no_grad():
            adam.step(lr)
        m.mul_(b1).add_(g, alpha=1 - b1)
        lerped.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        lr_p = lr * lr_mul
        upd = m / (v.sqrt() + ADAM_EPS) * (lr_p * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t))
        upd += (lr_p * lr_p * ADAM_WD * wd_mul) * w * ((upd * w) > 0)
        w = w - upd
        assert torch.equal(adam.slots[0].m, m) and torch.equal(adam.slots[0].v, v), t
        assert torch.equal(p.detach(), w), t
    assert not torch.equal(lerped, m), "a lerp would round differently (the check can tell)"


# ---- Adam vs reference ------------------------------------------------------------------
@pytest.mark.parametrize("adam_dtype", [torch.float32, torch.bfloat16])
def test_adam_steps_match_reference_including_even_step(adam_dtype):
    model = FakeModel(adam_dtype=adam_dtype)
    opt = make_opt(model)
    names = adam_names(model)
    params = dict(model.named_parameters())
    refs = {n: RefAdam(params[n], params[n].label) for n in names}
    # odd step
    g1 = random_grads(model, 200)
    set_grads(model, g1)
    opt.step(1.0, 0.85, adam_step=True)
    for n in names:
        refs[n].step(g1[n], ADAM_LR)
        assert params[n].grad is None
    # even step: Adam parameters do not move and keep their gradients
    before = {n: params[n].detach().clone() for n in names}
    g2 = random_grads(model, 201)
    set_grads(model, g2)
    opt.step(1.52, 0.9, adam_step=False)
    for n in names:
        assert torch.equal(params[n].detach(), before[n]), n
        assert torch.equal(params[n].grad, g2[n]), n
    # odd step: the two steps' gradients are used together
    g3 = random_grads(model, 202)
    set_grads(model, g3, accumulate=True)
    opt.step(1.73, 0.95, adam_step=True)
    for n in names:
        refs[n].step(g2[n] + g3[n], ADAM_LR * 1.73)  # accumulated in the param dtype, as autograd does
    for n in names:
        got = params[n].detach().double()
        if params[n].dtype == torch.float32:  # scalars, x0_lambda: always fp32
            torch.testing.assert_close(got, refs[n].p, rtol=1e-6, atol=1e-6, msg=n)
        else:  # bf16 storage: equal up to a rare differently rounded tie (one bf16 ulp)
            assert torch.all((got - refs[n].p).abs() <= refs[n].p.abs() * 2 ** -7), n
            assert (got != refs[n].p).double().mean().item() < 0.01, n


def test_adam_weight_decay_is_cautious_and_scaled_by_lr_squared():
    # value embeddings: lr_p = 0.008 * 75 = 0.6, decay lr_p^2 * 0.005 * 5 * p = 0.009 p where it applies
    model = FakeModel(adam_dtype=torch.float32)
    opt = make_opt(model)
    p = model.value_embeds[0]
    p0 = p.detach().double().clone()
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
    p.grad = g.clone()
    opt.step(1.0, 0.85, adam_step=True)
    # first step: m/sqrt(v) = sign(g) * sqrt(1-b2)/(1-b1), bias correction cancels it
    upd = 0.6 * torch.sign(g.double())
    same = (upd * p0) > 0
    expect = p0 - upd - same.double() * 0.6 ** 2 * 0.005 * 5 * p0
    torch.testing.assert_close(p.detach().double(), expect, rtol=1e-6, atol=1e-6)
    assert same.any() and (~same).any()


def test_unknown_or_missing_label_is_rejected():
    model = FakeModel()
    model.scalars.label = "scalar"
    with pytest.raises(ValueError, match="scalars"):
        make_opt(model)
    model = FakeModel()
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="extra"):
        make_opt(model)


# ---- split_embed and state_dict ---------------------------------------------------------
def test_split_embed_copies_weight_and_adam_state():
    model = FakeModel(adam_dtype=torch.float32)
    opt = make_opt(model)
    names = [n for n in adam_names(model) if n != "embed"]
    for step in range(4):
        set_grads(model, random_grads(model, 300 + step, names), accumulate=True)
        opt.step(1.0, 0.85, adam_step=step % 2 == 1)
    assert not torch.equal(model.embed.detach(), model.lm_head.detach())
    opt.split_embed()
    assert torch.equal(model.embed.detach(), model.lm_head.detach())
    # with the same gradient, an identical state must give identical updates (a fresh state
    # would take a step of exactly +-lr instead)
    g = torch.randn(V, D, generator=torch.Generator().manual_seed(8))
    model.lm_head.grad = g.clone()
    model.embed.grad = g.clone()
    opt.step(1.0, 0.85, adam_step=True)
    assert torch.equal(model.embed.detach(), model.lm_head.detach())


def test_state_dict_round_trip_is_bit_identical():
    model = FakeModel()
    opt = make_opt(model)

    def run(steps, first):
        for k in range(steps):
            set_grads(model, random_grads(model, 400 + first + k), accumulate=True)
            opt.step(1.0 + 0.1 * k, 0.9, adam_step=(first + k) % 2 == 1)

    run(2, 0)
    saved_opt = opt.state_dict()
    saved_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(3, 2)  # ends on an even step: Adam gradients stay pending
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved_params[n])
    opt.load_state_dict(saved_opt)
    assert all(p.grad is None for p in model.parameters())
    run(3, 2)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), after[n]), n
    assert any(not torch.equal(after[n], saved_params[n]) for n in after)


# ---- gradient sums over micro-batches ---------------------------------------------------
def _micro_grads(shape, dtype, n=8, seed=0, spread=20):
    """n gradients with magnitudes spread over 2^-spread..2^spread and both signs, in dtype."""
    gen = torch.Generator().manual_seed(seed)
    scale = 2.0 ** torch.randint(-spread, spread + 1, (n, *shape), generator=gen).float()
    return (torch.randn((n, *shape), generator=gen) * scale).to(dtype)


def _backward_each(p, grads):
    for g in grads:  # d/dp sum(p * g) = g exactly: g is representable in p's dtype
        (p.float() * g.float()).sum().backward()


# exact while the spread of magnitudes stays within 53 - 3 - (8 or 24) bits
@pytest.mark.parametrize("param_dtype,spread", [(torch.bfloat16, 20), (torch.float32, 10)])
def test_float64_grad_sums_are_exact_for_any_split_and_order(param_dtype, spread):
    shape = (24, 40)
    grads = _micro_grads(shape, param_dtype, spread=spread)
    # reference: math.fsum, the correctly rounded (here exact) sum of each element
    cols = grads.double().reshape(8, -1).T.tolist()
    ref = torch.tensor([math.fsum(c) for c in cols], dtype=torch.float64).view(shape)

    def summed(order, splits=1):
        """sums like `splits` processes of 8/splits micro-batches each, then adds the results"""
        total = None
        k = 8 // splits
        for r in range(splits):
            p = nn.Parameter(torch.zeros(shape, dtype=param_dtype))
            sums = tg.GradSums([p], torch.float64)
            _backward_each(p, [grads[i] for i in order[r * k:(r + 1) * k]])
            assert p.grad is None  # the hook moved it into the float64 buffer
            part = sums.get(p)
            assert part.dtype == torch.float64
            total = part.clone() if total is None else total + part
        return total

    forward = list(range(8))
    for order, splits in [(forward, 1), (forward[::-1], 1), ([3, 6, 0, 7, 2, 5, 1, 4], 1),
                          (forward, 2), (forward[::-1], 4), (forward, 8)]:
        assert torch.equal(summed(order, splits), ref), (order, splits)


def test_param_dtype_sums_depend_on_order_and_clear_resets():
    """The reason for wider sums: autograd's bf16 running sum depends on the order. And a
    cleared buffer starts over (copy, not add) at the next micro-batch."""
    grads = _micro_grads((32, 32), torch.bfloat16, seed=1)
    outs = []
    for order in (range(8), reversed(range(8))):
        p = nn.Parameter(torch.zeros(32, 32, dtype=torch.bfloat16))
        sums = tg.GradSums([p], None)
        _backward_each(p, [grads[i] for i in order])
        outs.append(sums.get(p).clone())
        assert sums.get(p) is p.grad and p.grad.dtype == torch.bfloat16
    assert not torch.equal(outs[0], outs[1])

    p = nn.Parameter(torch.zeros(32, 32, dtype=torch.bfloat16))
    sums = tg.GradSums([p], torch.float32)
    _backward_each(p, grads[:3])
    sums.clear(p)
    assert sums.get(p) is None
    _backward_each(p, grads[3:5])
    assert torch.equal(sums.get(p), grads[3].float() + grads[4].float())


def test_grad_sum_dtype_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for ws in (1, 2, 4, 8):
        assert tg.grad_sum_dtype("auto", cpu, ws) is torch.float64
        assert tg.grad_sum_dtype("param", cuda, ws) is None
        assert tg.grad_sum_dtype("float32", cpu, ws) is torch.float32
    assert [tg.grad_sum_dtype("auto", cuda, ws) for ws in (1, 2, 4, 8)] == [torch.float32] * 3 + [None]
    with pytest.raises(ValueError, match="grad_sum_dtype"):
        tg.grad_sum_dtype("bfloat16", cpu, 1)


def test_optimizers_step_from_the_sums_not_p_grad():
    """On CPU the Optimizers sum in float64 (auto): after the micro-batches' backwards p.grad
    is None and the step must use the buffers. Reference: the same model given the sum as
    p.grad (integer multiples of 2^-6, so the sum is exact in every dtype)."""
    a, b = FakeModel(), FakeModel()
    opt_a = tg.Optimizers(a, tg.Hyperparameters(), 0, 1)
    opt_b = tg.Optimizers(b, tg.Hyperparameters(grad_sum_dtype="param"), 0, 1)
    assert opt_a.grads.dtype is torch.float64 and opt_b.grads.dtype is None
    named = [(n, p) for n, p in a.named_parameters() if n != "embed"]
    for step in range(2):  # an even (Muon only) and an odd (Muon + Adam) step
        for j in range(4):
            sum((p.float() * _coeffs(step, j, i, p).float()).sum() for i, (n, p) in enumerate(named)).backward()
        assert all(p.grad is None for _, p in named if p.dtype == torch.bfloat16)
        set_grads(b, {n: sum(_coeffs(step, j, i, p).double() for j in range(4)).to(p.dtype)
                      for i, (n, p) in enumerate(named)}, accumulate=True)
        opt_a.step(1.0, 0.9, adam_step=step == 1)
        opt_b.step(1.0, 0.9, adam_step=step == 1)
    init = FakeModel()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
        assert n == "embed" or not torch.equal(pa, init.get_parameter(n)), n
    assert all(p.grad is None for p in a.parameters()) and not any(opt_a.grads.filled.values())


# ---- distributed ------------------------------------------------------------------------
def test_muon_groups():
    kinds = ["attn"] * 10 + ["mlp"] * 22
    for ws in (1, 2, 4, 8):
        groups = tg.muon_groups(kinds, ws)
        flat = [i for g in groups for i in g if i is not None]
        assert sorted(flat) == list(range(32)), ws
        for g in groups:
            assert len(g) % ws == 0
            k = len(g) // ws
            for r in range(ws):
                chunk = [i for i in g[r * k:(r + 1) * k] if i is not None]
                assert len({kinds[i] for i in chunk}) <= 1, (ws, r, chunk)
    assert tg.muon_groups(kinds, 1) == [list(range(10)), list(range(10, 32))]
    assert tg.muon_groups(kinds, 2) == [list(range(10)), list(range(10, 32))]
    assert tg.muon_groups(kinds, 4) == [list(range(10)) + [None] * 2, list(range(10, 32)) + [None] * 2]
    g8 = tg.muon_groups(kinds, 8)
    assert g8 == [list(range(16)), list(range(16, 32))]
    owners = {r: [g[2 * r:2 * r + 2] for g in g8] for r in range(8)}
    assert owners[0] == [[0, 1], [16, 17]] and owners[4] == [[8, 9], [24, 25]]
    assert owners[5] == [[10, 11], [26, 27]]  # ranks 5-7 get MLP in the first group
    with pytest.raises(ValueError):
        tg.muon_groups(["attn"] * 3 + ["mlp"] * 5, 2, packed=True)


SPLIT_AFTER = 3  # the split happens after this (odd) step


def _coeffs(step, vrank, idx, p):
    """Per virtual-rank gradient: small integers * 2^-6, so every sum/average is exact in bf16."""
    gen = torch.Generator().manual_seed(step * 100_000 + vrank * 1000 + idx)
    return (torch.randint(-8, 9, p.shape, generator=gen).float() * 2.0 ** -6).to(p.dtype)


def _train(rank, world_size, packed, arm, steps=6):
    """The loop's protocol: 8 virtual ranks = world_size * grad_accum micro-batches."""
    model = FakeModel()
    opt = make_opt(model, rank, world_size, muon_packed=packed)
    accum = tg.VIRTUAL_RANKS // world_size
    named = list(model.named_parameters())
    for step in range(steps):
        adam_step = step % 2 == 1
        for micro in range(accum):
            vrank = rank * accum + micro
            # arm: the loop's protocol (the last micro-batch of an Adam step starts its collectives
            # from the finished sums); without it every collective starts at step time
            with opt.micro_batch(last=micro == accum - 1, adam_step=adam_step) if arm else contextlib.nullcontext():
                loss = sum((p * _coeffs(step, vrank, idx, p)).float().sum()
                           for idx, (n, p) in enumerate(named) if n != "embed" or step > SPLIT_AFTER)
                (loss / accum).backward()
        opt.step(1.0 + 0.25 * step, 0.85 + 0.02 * step, adam_step)
        if step == SPLIT_AFTER:
            opt.split_embed()
    return {n: p.detach().clone() for n, p in named}


def _dist_worker(rank, world_size, port, out_dir, configs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for name, packed, arm in configs:
            torch.save(_train(rank, world_size, packed, arm), os.path.join(out_dir, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world_size, configs, out_dir, limit_s=900):
    ctx = mp.start_processes(_dist_worker, args=(world_size, _free_port(), str(out_dir), configs),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.time() + limit_s
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed run with {world_size} processes exceeded {limit_s} s")


@pytest.fixture(scope="module")
def single_process_result():
    return _train(0, 1, None, arm=True)


@pytest.mark.parametrize("world_size,configs", [
    (2, [("perkind", None, True)]),
    (4, [("perkind", None, True), ("packed", True, False)]),  # packed: the 8-rank grouping scheme
])
def test_distributed_matches_single_process(world_size, configs, tmp_path, single_process_result):
    _spawn(world_size, configs, tmp_path)
    ref = single_process_result
    init = dict(FakeModel().named_parameters())
    assert all(not torch.equal(ref[n], init[n].detach()) for n in ref)  # everything trained
    for name, _, _ in configs:
        for rank in range(world_size):
            got = torch.load(tmp_path / f"{name}_{rank}.pt")
            for n, t in ref.items():
                torch.testing.assert_close(got[n].float(), t.float(), rtol=1e-5, atol=1e-6,
                                           msg=f"{name} rank {rank} {n}")


# ---- compiled optimizer pieces ----------------------------------------------------------
def test_compiled_optimizer_pieces_match_the_reference_without_recompiles():
    """With compile=True, NorMuon's elementwise work (normuon_apply_) and the Adam update run
    through torch.compile(fullgraph=True) (inductor's CPU code here, Triton on GPU). Against the
    float64 references of ALGORITHM.md 3, over steps with a changing lr and momentum, they agree like
    the eager code does; the scheduled values are 0-d tensors, so after the first step no
    graph is compiled again (error_on_recompile)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    attn = nn.Parameter(torch.randn(4 * D, D, generator=gen).bfloat16())
    mlp = nn.Parameter(torch.randn(4 * D, D, generator=gen).bfloat16())
    emb = nn.Parameter(torch.randn(V, D, generator=gen).bfloat16())
    muon = tg.NorMuon([attn, mlp], ["attn", "mlp_proj"], weight_decay=MUON_WD, beta2=MUON_B2, compile=True)
    adam = tg.DistAdam([emb], ["value_embed"], eps=ADAM_EPS, weight_decay=ADAM_WD, compile=True)
    refs = [RefMuon(attn, "attn"), RefMuon(mlp, "mlp_proj")]
    ref_adam = RefAdam(emb, "value_embed")
    schedule = [(1.0, 0.85), (1.52, 0.9), (1.73, 0.95), (0.4, 0.95)]
    for step, (lr_mult, mu) in enumerate(schedule):
        grads = [torch.randn(4 * D, D, generator=gen).bfloat16() for _ in range(2)]
        g_emb = torch.randn(V, D, generator=gen).bfloat16()
        attn.grad, mlp.grad, emb.grad = grads[0].clone(), grads[1].clone(), g_emb.clone()
        with torch._dynamo.config.patch(error_on_recompile=step > 0), torch.no_grad():
            muon.step(MUON_LR * lr_mult, mu)
            adam.step(ADAM_LR * lr_mult)
        for ref, g in zip(refs, grads):
            ref.step(g, MUON_LR * lr_mult, mu)
        ref_adam.step(g_emb, ADAM_LR * lr_mult)
    for j, ref in enumerate(refs):
        got = tg.fp32_from_bf16_and_mantissa(muon.params[j].detach(), muon.groups[j].mantissa[0]).double()
        torch.testing.assert_close(got, ref.p, rtol=0, atol=2e-5)
    got = emb.detach().double()
    assert torch.all((got - ref_adam.p).abs() <= ref_adam.p.abs() * 2 ** -7)
    assert (got != ref_adam.p).double().mean().item() < 0.01
    assert (ref_adam.p - torch.randn(V, D, generator=torch.Generator().manual_seed(11)).double()).abs().max() > 1e-2
