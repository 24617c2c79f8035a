"""tools/preflight.py at the tiny size: the checks pass on this trainer, and they fail, naming
the problem, on a copy of it with a host-device sync and a recompile put into the step."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def start_preflight(*args, prefix=()):
    """The preflight of the tiny preset in a subprocess (one thread), started now; `prefix`
    goes before the command (conftest.py's early runs: `nice`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([*prefix, sys.executable, str(REPO / "tools" / "preflight.py"), "--preset=tiny", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out, _ = proc.communicate(timeout=3000)
    return proc.returncode, out


def edited_trainer(folder: Path) -> Path:
    """A copy of train_gpt.py with a host-device sync in every training step and, in the
    last step only (which the warm-up does not visit), a new shape: one recompile."""
    src = (REPO / "train_gpt.py").read_text()
    edited = src.replace(
        "        adam_step = step % 2 == 1\n",
        "        adam_step = step % 2 == 1\n"
        "        torch.ones((), device=self.device).sum().item()  # a sync: waits for the GPU\n", 1).replace(
        "                loss = self.forward(inputs, targets, cu_seqlens, args.train_max_seq_len, weights)",
        "                loss = self.forward(inputs, targets, cu_seqlens,\n"
        "                                    args.train_max_seq_len + (step == total_steps(args) - 1), weights)", 1)
    assert edited.count("a sync: waits") == 1 and "train_max_seq_len + (step ==" in edited
    script = folder / "train_gpt.py"
    script.write_text(edited)
    return script


def start_preflight_runs(tmp_path_factory, prefix=()) -> dict:
    """Both preflights of this file, started now (each is one thread): {"trainer": the
    trainer with --roofline, "edited": the edited copy on a 9-step schedule without an
    extension (fewer shapes to compile; its last step is one the warm-up does not visit)}.
    conftest.py starts them when the session starts, at a lower priority (`prefix`: `nice`),
    so that they run on what the in-process tests before this file leave idle."""
    script = edited_trainer(tmp_path_factory.mktemp("edited"))
    return dict(trainer=start_preflight("--roofline", prefix=prefix),
                edited=start_preflight(f"--script={script}", "--num_scheduled_iterations=9",
                                       "--num_extension_iterations=0", prefix=prefix))


@pytest.fixture(scope="module")
def preflight_runs(early_runs, tmp_path_factory):
    """The two preflights' (exit code, output), by name (start_preflight_runs)."""
    procs = early_runs.get("preflight") or start_preflight_runs(tmp_path_factory)
    return {name: finish(proc) for name, proc in procs.items()}


def test_preflight_passes_on_the_trainer(preflight_runs):
    code, out = preflight_runs["trainer"]
    assert code == 0, out[-3000:]
    for line in ("graph breaks: 0", "recompiles in the timed run: 0", "host-device syncs per training step: 0",
                 "FP8 lm_head op bodies (forward + backward): 0 host-device syncs", "preflight: OK"):
        assert line in out, line
    for k in (3, 2, 1):
        assert f"loss head with {k} prediction(s): backward 1 (bfloat16), forward 0 (none)" in out
    assert "graphs compiled in the warm-up: " in out and "normuon_apply_" in out and "adam_update" in out
    # the roofline lines, in the form scripts read (the one-pass fused head: 2 + 2 + 2 x 1 bytes)
    assert "loss head (T, V) traffic per training micro-batch: 6.0 bytes/element (forward 6.0, backward 0.0)" in out
    assert re.search(r"^roofline step ms \(H100 SXM model\): stage 1: [0-9.]+, stage 2: [0-9.]+, "
                     r"stage 3: [0-9.]+, extension: [0-9.]+$", out, re.M), out[-2000:]
    assert re.search(r"^roofline stage 3 by kind, ms: matmul: [0-9.]+, attention: [0-9.]+, memory-bound: [0-9.]+, "
                     r"transcendental-bound: [0-9.]+, optimizer: [0-9.]+$", out, re.M), out[-2000:]
    assert "(T, V) tensors saved for the backward: float8_e5m2 (T, V), float8_e5m2 (V, T)" in out
    assert ("MLP (T, 4d) traffic per layer per training micro-batch: 6.0 bytes/element (forward 2.0, "
            "backward 4.0); (T, 4d) tensors saved for the backward per layer: 1") in out


def load_preflight():
    spec = importlib.util.spec_from_file_location("preflight_under_test", REPO / "tools" / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_model_counts_the_loss_heads_traffic_as_counted_by_hand():
    """The preflight's kernel model on the two loss heads, traced on meta as the model's graph
    is: bytes per (T, V) element, every write and every non-matmul read. By hand, unfused:
    the FP8 matmul writes bf16 logits (2), the loss reads them (2); its backward reads them
    (2) and writes a bf16 gradient (2), which one fused kernel reads (2) to write the e5m2
    copy and its transpose (1 + 1) that the two FP8 matmuls read. Fused in two passes: the
    matmul's 2, the kernel's two reads (2 + 2) and two e5m2 writes (1 + 1); in one pass the
    same with one read (the matmul's epilogue sums the log-sum-exp); backwards of matmuls only."""
    import torch

    pf = load_preflight()
    tg = pf.tg
    T, V, d = 96, 640, 32

    def unfused(x, w, t, wt):
        return tg.mtp_loss(tg.fp8_mm(x, w, tg.FP8_X_SCALE, tg.FP8_W_SCALE, tg.FP8_GRAD_SCALE)[0], t, wt)

    def fused(x, w, t, wt):
        return tg.fused_loss_head(x, w, t, wt, 0.125, one_pass=True)

    def fused_two_passes(x, w, t, wt):
        return tg.fused_loss_head(x, w, t, wt, 0.125, one_pass=False)

    found = {}
    for head in (unfused, fused, fused_two_passes):
        rec = pf.GraphRecorder()
        f = torch.compile(head, backend=rec.backend_for(head.__name__), fullgraph=True, dynamic=False)
        x = torch.empty(T, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
        w = torch.empty(V, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
        (f(x, w, torch.empty(T, dtype=torch.int64, device="meta"), torch.empty(3, device="meta")) * 0.125).backward()
        graphs = {kind: gm for _, _, kind, gm in rec.graphs}
        aliases = pf.saved_aliases(graphs["forward"])
        found[head.__name__] = tuple(pf.tv_traffic(pf.graph_kernels(graphs[k], aliases=aliases), T, V)
                                     for k in ("forward", "backward"))
        found[head.__name__ + " saved"] = pf.saved_tv(graphs["forward"], T, V)
    assert found["unfused"] == (4.0, 8.0) and found["fused"] == (6.0, 0.0) and found["fused_two_passes"] == (8.0, 0.0)
    assert found["unfused saved"] == ["bfloat16 (T, V)"]
    assert found["fused saved"] == found["fused_two_passes saved"] == ["float8_e5m2 (T, V)", "float8_e5m2 (V, T)"]


def test_preflight_fails_on_a_sync_and_a_recompile(preflight_runs):
    code, out = preflight_runs["edited"]
    assert code == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("preflight: FAILED") and "recompile(s) in the timed run" in last, last
    assert "host-device sync(s) in training steps" in last, last


def test_kernel_model_counts_the_mlps_traffic_as_counted_by_hand():
    """The same for one MLP, per (T, 4d) element. By hand, unfused: the matmul writes the
    pre-activation (2), a kernel reads it (2) and writes relu of it (2, kept for the
    backward) and h (2); in the backward the matmul writes dh (2), a kernel reads dh and the
    kept relu (2 + 2) and writes d(pre) (2). Fused: the matmul writes h (2); the backward's
    matmul reads h in its epilogue (2) and writes d(pre) (2). Kept for the backward: relu of
    the pre-activation and h, then h alone."""
    import torch

    pf = load_preflight()
    tg = pf.tg
    T, d = 64, 32
    found = {}
    for mlp in (tg.unfused_mlp, tg.fused_mlp):
        rec = pf.GraphRecorder()
        f = torch.compile(mlp, backend=rec.backend_for(mlp.__name__), fullgraph=True, dynamic=False)
        x, c_fc, c_proj = (torch.empty(*shape, dtype=torch.bfloat16, device="meta", requires_grad=True)
                           for shape in ((T, d), (4 * d, d), (4 * d, d)))
        f(x, c_fc, c_proj).sum().backward()
        graphs = {kind: gm for _, _, kind, gm in rec.graphs}
        aliases = pf.saved_aliases(graphs["forward"])
        found[mlp.__name__] = tuple(pf.tv_traffic(pf.graph_kernels(graphs[k], aliases=aliases), T, 4 * d)
                                    for k in ("forward", "backward"))
        found[mlp.__name__ + " saved"] = len(pf.saved_tv(graphs["forward"], T, 4 * d))
    assert found["unfused_mlp"] == (8.0, 8.0) and found["fused_mlp"] == (2.0, 4.0)
    assert found["unfused_mlp saved"] == 2 and found["fused_mlp saved"] == 1


def test_kernel_model_counts_special_functions_and_prices_them_by_hand():
    """The third roof. On a graph of known ops, per element: sigmoid 2 (exp and reciprocal),
    exp 1, a division by a tensor 1, a division by a number 0 (a multiply); rsqrt once per
    row of a (T, 1) reduction. Then the pricing rules on a kernel with figures given by hand:
    too few loads in flight derate its bandwidth by their fraction; one block per SM adds a
    matmul's special functions to its main loop instead of overlapping them."""
    import torch

    pf = load_preflight()
    T, n = 64, 256

    def f(x, y):
        return torch.exp(torch.sigmoid(x / 7.5)) / y * torch.rsqrt(x.square().mean(-1, keepdim=True))

    rec = pf.GraphRecorder()
    g = torch.compile(f, backend=rec.backend_for("f"), fullgraph=True, dynamic=False)
    g(torch.empty(T, n, device="meta"), torch.empty(T, n, device="meta"))
    gm = next(gm for _, _, kind, gm in rec.graphs if kind == "forward")
    kernels = pf.graph_kernels(gm)
    assert sum(k.sfu for k in kernels) == T * n * (2 + 1 + 1) + T

    H = pf.H100_SXM
    bw = H["bandwidth"] * pf.ROOFLINE_EFFICIENCY["bandwidth"]
    k = pf.Kernel("by hand", read=[(10 ** 9, 4 * 10 ** 9)], elements=10 ** 9)
    fig = pf.kernel_report.Figures("f", "c", 4, 3, 64, 0, 0, blocks=2, limit="registers", pipelined=False,
                                   sfu_per_element=1.0, in_flight=int(pf.kernel_report.BYTES_IN_FLIGHT_NEEDED / 2))
    t = k.terms(fig)
    assert t["bytes"] == pytest.approx(4e9 / (bw * 0.5), rel=1e-3) and t["sfu"] == pytest.approx(1e9 / H["sfu"])
    mm = pf.Kernel("matmul by hand", flops=2e12, elements=10 ** 9)
    fig.blocks = 1
    serial = mm.terms(fig)
    fig.blocks = 2
    overlapped = mm.terms(fig)
    matmul_s = 2e12 / (H["bf16"] * pf.ROOFLINE_EFFICIENCY["matmul"])
    assert serial["flops"] == pytest.approx(matmul_s + 1e9 / H["sfu"]) and "sfu" not in serial
    assert overlapped["flops"] == pytest.approx(matmul_s) and overlapped["sfu"] == pytest.approx(1e9 / H["sfu"])
    assert mm.kind() == "matmul"
