"""Checks the Triton symmetric-matmul kernels against float64 references; exits non-zero on a
mismatch. On CPU run it with TRITON_INTERPRET=1 (the interpreter must be chosen before triton
is imported; tests/test_optim.py does this); on a CUDA machine run it plainly to check the
compiled, autotuned kernels in fp32 (TF32 dot products) and bf16."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

interpreted = os.environ.get("TRITON_INTERPRET") == "1"
device = "cpu" if interpreted else "cuda"
if not interpreted and not torch.cuda.is_available():
    sys.exit("needs TRITON_INTERPRET=1 or a CUDA device")
# the interpreter's fp32 dot is exact; on GPU fp32 goes through TF32 and bf16 rounds the output
cases = [(torch.float32, 1e-4)] if interpreted else [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)]
xxt_shapes = [(50, 37), (3, 45, 70), (2, 70, 33), (32, 64)]
sym_shapes = [(45, 45), (2, 45, 45), (3, 64, 64), (1, 70, 70)]
if not interpreted:  # the record's shapes too
    xxt_shapes += [(8, 768, 768), (2, 768, 3072), (300, 1000)]
    sym_shapes += [(8, 768, 768), (2, 768, 768)]


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


torch.manual_seed(0)
failed = False
for dtype, tol in cases:
    worst = 0.0
    for shape in xxt_shapes:  # sizes not divisible by the blocks, batched and 2-D, wide and tall
        A = torch.randn(shape, device=device).to(dtype)
        out = tg.sym_xxt(A, use_triton=True)
        assert out.shape == A.shape[:-1] + A.shape[-2:-1] and out.dtype == dtype
        worst = max(worst, rel_err(out, A.double() @ A.double().mT))
    for shape in sym_shapes:
        X = torch.randn(shape, device=device) / shape[-1] ** 0.5
        A = ((X @ X.mT + (X @ X.mT).mT) / 2).to(dtype)  # exactly symmetric
        b, c = -2.808917465908714, 0.5000178451051316
        ref = b * A.double() + c * (A.double() @ A.double())
        worst = max(worst, rel_err(tg.sym_ba_plus_caa(A, b, c, use_triton=True), ref))
        buf = torch.full_like(A, float("nan"))  # preallocated output, as Polar Express uses it
        tg.sym_ba_plus_caa(A, b, c, out=buf, use_triton=True)
        worst = max(worst, rel_err(buf, ref))
    print(f"{device} {dtype}: max relative error {worst:.3e} (tolerance {tol:g})")
    failed |= not worst < tol
sys.exit(1 if failed else 0)
