"""Checks the Triton symmetric-matmul kernels on CPU. Run with TRITON_INTERPRET=1 (the
interpreter must be chosen before triton is imported); exits non-zero on a mismatch."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import train_gpt as T  # noqa: E402


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


torch.manual_seed(0)
worst = 0.0
# sizes not divisible by the interpreter's 32-wide blocks, batched and 2-D, wide and tall
for shape in [(50, 37), (3, 45, 70), (2, 70, 33), (32, 64)]:
    A = torch.randn(shape)
    out = T.sym_xxt(A, force_triton=True)
    ref = A.double() @ A.double().mT
    assert out.shape == ref.shape, (out.shape, ref.shape)
    worst = max(worst, rel_err(out, ref))
for shape in [(45, 45), (2, 45, 45), (3, 64, 64), (1, 70, 70)]:
    X = torch.randn(shape)
    A = X @ X.mT
    A = (A + A.mT) / 2  # exactly symmetric
    b, c = -2.808917465908714, 0.5000178451051316
    out = T.sym_ba_plus_caa(A, b, c, force_triton=True)
    ref = b * A.double() + c * (A.double() @ A.double())
    worst = max(worst, rel_err(out, ref))
    # preallocated output, as Polar Express uses it
    buf = torch.full_like(A, float("nan"))
    T.sym_ba_plus_caa(A, b, c, out=buf, force_triton=True)
    worst = max(worst, rel_err(buf, ref))
print(f"max relative error {worst:.3e}")
sys.exit(0 if worst < 1e-4 else 1)
