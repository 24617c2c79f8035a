"""Checks the fused kernels of train_gpt against float64 references and the unfused paths;
exits non-zero on a mismatch. The loss head (section 2d), in one pass and in two: loss,
its e5m2 gradient, grad_x and grad_w against float64 and the unfused FP8 head; for the one
pass also its matmul's fp16 sigmoids and log-sum-exp partial sums against float64, and its
loss against float64 of the unrounded logits. The MLP (section 2e): activation,
output and gradients against float64 autograd of relu(x @ c_fc^T)^2 @ c_proj and the
unfused bf16 MLP. On CPU run it with TRITON_INTERPRET=1 (tests/test_optim.py does this in
a subprocess); on a CUDA machine run it plainly (tools/bench.py does), which adds the
record's shapes."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
E5M2 = torch.float8_e5m2
failures = []


def check(ok, what):
    print(f"[{'PASS' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


# ---- the fused loss head ------------------------------------------------------------------
def reference(logits, targets, weights, grad_scale, sigmoids=None):
    """float64, from the formulas of ALGORITHM.md 2.6: the summed loss and dloss/dlogits (times
    grad_scale), from the logits; or, for the one-pass head, from its fp16 sigmoids s of the
    softcap (z = 23 s, dz/dlogit = (23 / 7.5) s (1 - s))."""
    if sigmoids is None:
        x = logits.double().requires_grad_()
        z = 23 * torch.sigmoid((x + 5) / 7.5)
    else:
        s = sigmoids.double()
        z = (23 * s).requires_grad_()
    n = z.size(0)
    loss = sum(wk * torch.nn.functional.cross_entropy(z[:n - k], targets[k:], reduction="sum")
               for k, wk in enumerate(weights.tolist()))
    loss.backward()
    grad = x.grad if sigmoids is None else z.grad * (23 / 7.5) * s * (1 - s)
    return loss.item(), grad * grad_scale


def loss_case(T_, V, d, weights, grad_accum, incoming=None, seed=0, one_pass=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T_, d, generator=g) * 20).bfloat16().to(device)
    w = (torch.randn(V, d, generator=g) * 0.05).bfloat16().to(device)
    targets = torch.randint(0, V, (T_,), generator=g)
    targets[3:7] = 11  # a target repeated within the K offsets
    targets[-2:] = targets[-3]  # and in the last K-1 positions
    targets = targets.to(device)
    wts = torch.tensor(weights, device=device)
    scale = 1 / grad_accum
    incoming = scale if incoming is None else incoming
    name = (f"{'one pass' if one_pass else 'two passes'} T={T_} V={V} K={len(weights)} 1/{grad_accum}"
            + (f" incoming {incoming}" if incoming != scale else ""))

    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    fused = tg.fused_loss_head(xa, wa, targets, wts, scale, one_pass=one_pass)
    (fused * incoming).backward()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = tg.fp8_mm(xb, wb, tg.FP8_X_SCALE, tg.FP8_W_SCALE, tg.FP8_GRAD_SCALE)[0]
    unfused = tg.mtp_loss(logits, targets, wts)
    (unfused * incoming).backward()

    head_logits, sigmoids = logits.detach(), None
    if one_pass:  # the head's own matmul (Triton, FP8) and epilogue: fp16 sigmoids and partial sums
        x8, w8 = tg._fp8_quantize(x, w)
        sigmoids, partial = tg.fp8_sigmoid_lse(x8, w8)
        exact = (x8.cpu().double() @ w8.cpu().double().T) * (tg.FP8_X_SCALE * tg.FP8_W_SCALE)
        want = torch.sigmoid((exact + 5) / 7.5).to(torch.float16)
        same = (sigmoids.cpu() == want).double().mean().item()
        ulp = (sigmoids.cpu().double() - want.double()).abs() <= want.double().abs() * 2 ** -10
        check(sigmoids.dtype == torch.float16 and same >= 0.999 and bool(ulp.all()),
              f"{name}: epilogue sigmoids = float64 sigmoid of the exact logits rounded once to fp16 "
              f"({100 * same:.3f}% bitwise, rest 1 ulp)")
        cols = torch.arange(V) // tg.LSE_COLUMNS
        want_p = torch.zeros(T_, partial.size(1), dtype=torch.float64).index_add_(
            1, cols, (23 * sigmoids.cpu().double()).exp())
        check(partial.shape == (T_, -(-V // tg.LSE_COLUMNS)) and rel(partial, want_p) < 1e-6,
              f"{name}: epilogue sums of exp(23 s) per {tg.LSE_COLUMNS} columns ({rel(partial, want_p):.1e})")
        # the rounding the one-pass head chose (fp16 s), against float64 of the unrounded logits,
        # within the start-up check's tolerance for the loss
        truth, _ = reference(exact, targets.cpu(), wts.cpu(), incoming)
        err = abs(fused.item() - truth) / abs(truth)
        check(err <= tg.PROOF_TOLERANCES["loss"], f"{name}: loss vs float64 of the exact logits {err:.1e} "
              f"(tolerance {tg.PROOF_TOLERANCES['loss']:.0e})")
    ref_loss, ref_grad = reference(head_logits.cpu(), targets.cpu(), wts.cpu(), incoming,
                                   None if sigmoids is None else sigmoids.cpu())
    check(abs(fused.item() - ref_loss) <= 2e-6 * abs(ref_loss), f"{name}: loss {fused.item():.6f} vs float64 {ref_loss:.6f}")
    # the unfused head rounds the logits to bf16, the one-pass head the sigmoids to fp16: at
    # these few rows the unfused loss is up to ~1.5e-4 from float64's, the one-pass one ~1e-5
    tol = 3e-4 if one_pass else 2e-6
    check(abs(fused.item() - unfused.item()) <= tol * abs(unfused.item()),
          f"{name}: loss vs the unfused head (within {tol:.0e}: {abs(fused.item() / unfused.item() - 1):.1e})")
    # the kernel's e5m2 gradient: dloss/dlogits * incoming / grad_s rounded once
    _, g8, gt8, x8, w8 = tg.fused_loss_head_op(x, w, targets, wts, scale, one_pass)
    want = (ref_grad / incoming * scale / tg.FP8_GRAD_SCALE).float().to(E5M2)
    same = (g8.cpu().view(torch.uint8) == want.view(torch.uint8)).float().mean().item()
    near = ((g8.cpu().float() - want.float()).abs() <= want.float().abs() * 0.25 + 2 ** -16).all().item()
    check(same >= 0.999 and near, f"{name}: e5m2 gradient = float64 rounded once ({100 * same:.3f}% bitwise, rest 1 ulp)")
    check(torch.equal(gt8.T.cpu().view(torch.uint8), g8.cpu().view(torch.uint8)), f"{name}: (V, T) copy = (T, V) transposed")
    # grad_x, grad_w: the FP8 matmuls of that gradient, against float64 products of the same
    # e5m2 / e4m3 values, and against the unfused head (which rounds through bf16 first)
    gd = g8.cpu().double() * tg.FP8_GRAD_SCALE * (incoming / scale)
    want_x = gd @ (w8.cpu().double() * tg.FP8_W_SCALE)
    want_w = gd.T @ (x8.cpu().double() * tg.FP8_X_SCALE)
    check(rel(xa.grad.cpu(), want_x) < 1e-2, f"{name}: grad_x vs float64 of the e5m2 gradient ({rel(xa.grad.cpu(), want_x):.1e})")
    check(rel(wa.grad.cpu(), want_w) < 1e-2, f"{name}: grad_w vs float64 of the e5m2 gradient ({rel(wa.grad.cpu(), want_w):.1e})")
    check(rel(xa.grad.cpu(), xb.grad.cpu()) < 0.05 and rel(wa.grad.cpu(), wb.grad.cpu()) < 0.05,
          f"{name}: grads vs the unfused head ({rel(xa.grad.cpu(), xb.grad.cpu()):.1e}, "
          f"{rel(wa.grad.cpu(), wb.grad.cpu()):.1e}; e5m2 rounded once vs through bf16)")


for one_pass in (True, False):
    for weights in ([1.0, 0.5, 0.25], [1.0, 0.5], [1.0]):
        loss_case(37, 200, 32, weights, grad_accum=8, one_pass=one_pass)
    loss_case(37, 200, 32, [1.0, 0.5, 0.25], grad_accum=1, seed=1, one_pass=one_pass)
    loss_case(20, 130, 16, [1.0, 0.5, 0.25], grad_accum=8, incoming=0.3, seed=2, one_pass=one_pass)  # not the told scale
    if device == "cuda":
        loss_case(4096, 50304, 768, [1.0, 0.5, 0.25], grad_accum=8, seed=3, one_pass=one_pass)  # the record's V and d

# ---- the fused MLP ------------------------------------------------------------------------
def mlp_case(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[3] = -1.0  # with c_fc's first rows > 0 below: rows and columns of all-negative pre-activations
    c_fc = torch.randn(4 * d, d, generator=g) * d ** -0.5
    c_fc[:5] = c_fc[:5].abs()
    c_proj = torch.randn(4 * d, d, generator=g) * 0.1
    grad = torch.randn(n, d, generator=g)
    x, c_fc, c_proj, grad = (t.bfloat16().to(device) for t in (x, c_fc, c_proj, grad))
    name = f"T={n} d={d}"
    pre = (x.double() @ c_fc.double().T).cpu()
    check(bool((pre[3, :5] < 0).all()) and bool((pre < 0).any(1).all()), f"{name}: negative pre-activations present")

    fused = [t.clone().requires_grad_() for t in (x, c_fc, c_proj)]
    out = tg.fused_mlp(*fused)
    out.backward(grad)
    ref = [t.double().cpu().requires_grad_() for t in (x, c_fc, c_proj)]
    ref_out = torch.relu(ref[0] @ ref[1].T).square() @ ref[2]
    ref_out.backward(grad.double().cpu())
    plain = [t.clone().requires_grad_() for t in (x, c_fc, c_proj)]
    plain_out = tg.unfused_mlp(*plain)
    plain_out.backward(grad)

    h = tg.mlp_up_relu2(x, c_fc)
    ref_h = torch.relu(pre).square()
    check(rel(h, ref_h) < 4e-3 and bool((h.cpu()[pre <= 0] == 0).all()), f"{name}: activation relu(x W^T)^2 "
          f"(rel {rel(h, ref_h):.1e}; exactly 0 where the pre-activation is not positive)")
    for what, got, want, other in [("output", out, ref_out, plain_out), ("grad_x", fused[0].grad, ref[0].grad, plain[0].grad),
                                   ("grad c_fc", fused[1].grad, ref[1].grad, plain[1].grad),
                                   ("grad c_proj", fused[2].grad, ref[2].grad, plain[2].grad)]:
        e_fused, e_plain = rel(got, want), rel(other, want)
        check(got.dtype == torch.bfloat16 and e_fused < 1e-2 and e_fused < 2 * e_plain + 1e-3,
              f"{name}: {what} vs float64 {e_fused:.1e} (unfused bf16 MLP: {e_plain:.1e})")


mlp_case(70, 48, 0)
mlp_case(128, 32, 1)
if device == "cuda":
    mlp_case(4096, 768, 2)  # the record's width
sys.exit(1 if failures else 0)
