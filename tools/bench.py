"""Benchmark and GPU checks for the record configuration (issue 6), on the visible device.

    python tools/bench.py                       # record config, synthetic shards, 1 process
    python tools/bench.py --preset tiny --steps 2  # CPU smoke run of the same code

Times steps of every batch/window stage without running the whole schedule and prints:
compile/warm-up seconds (with --warmup=false each stage compiles in its two untimed
settle steps instead: the "settle s" column), ms per step per stage (and per GPU at the
per-rank load of an 8-GPU run: one process does all 8 micro-batches, so that figure is
the step / 8), tokens/s, model FLOPs utilization against 989 TFLOP/s bf16 per H100,
peak memory. Before that, the start-up plan the trainer would take (train_gpt.resolve_plan:
every fast path checked against its reference at the run's shapes and timed, the same code
as the trainer's), one [PASS]/[FAIL] line per fast path it checked, the fused kernels
against float64 at the record's shapes (tools/fused_kernels_check.py, on CUDA) and each
fused path's time per stage; after it, that a training step never waits for the GPU (no
host-device sync) and that an optimizer step ran.
Extra flags are Hyperparameters overrides (see train_gpt.py --help).
"""
import argparse
import functools
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

# The H100 SXM, for MFU here, the roofline model of tools/preflight.py and the sm90 kernel
# report of tools/kernel_report.py: dense bf16 and FP8 tensor-core FLOP/s and HBM3 bytes/s
# (NVIDIA's data sheet); special-function ops/s (ex2, rcp, ...: 16 per SM per clock, the
# FlashAttention-3 paper's 3.9 TFLOP/s); per SM: registers, shared memory (227 KB of it for
# one block, 1 KB reserved per block), warps and blocks (CUDA's sm90 limits)
H100_SXM = dict(bf16=989e12, fp8=1979e12, bandwidth=3.35e12, sfu=3.9e12, sms=132,
                regs_per_sm=65536, shared_per_sm=228 * 1024, shared_per_block=227 * 1024,
                shared_reserved=1024, warps_per_sm=64, blocks_per_sm=32)
H100_BF16_FLOPS = H100_SXM["bf16"]


@functools.lru_cache(maxsize=None)
def shard_writer():
    """train_gpt.write_shard: the trainer's, or this repository's where the trainer is an
    older script without it (tools/preflight.py --script=OTHER; the format is the same)."""
    if hasattr(tg, "write_shard"):
        return tg.write_shard
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_gpt_of_this_repository",
                                                  Path(__file__).resolve().parents[1] / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.write_shard


def write_synthetic_shards(folder: Path, train_tokens: int, val_tokens: int, seed: int = 0):
    """Documents with geometric lengths (mean ~400), each starting with BOS; tokens from a
    Zipf-like distribution over the GPT-2 vocabulary."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, 50257, dtype=np.float64)
    probs = 1 / ranks ** 1.1
    probs /= probs.sum()
    for name, n in (("synth_val_000000.bin", val_tokens), ("synth_train_000001.bin", train_tokens)):
        tokens = rng.choice(50256, size=n, p=probs).astype(np.uint16)
        starts = np.cumsum(rng.geometric(1 / 400, size=n // 100 + 10))
        tokens[0] = tg.BOS_ID
        tokens[starts[starts < n]] = tg.BOS_ID
        shard_writer()(folder / name, tokens)


def attended_keys(cu_seqlens: torch.Tensor, T: int, window: int) -> int:
    """Number of (query, key) pairs attended in a packed batch with this window."""
    doc = tg.document_ids(cu_seqlens, T)
    starts = cu_seqlens.long()[doc.long()]
    pos_in_doc = torch.arange(T, device=cu_seqlens.device) - starts
    return int(torch.clamp(pos_in_doc + 1, max=window + 1).sum())


def attention_layers() -> list[tuple[str, bool]]:
    """(window, paired) of each attention layer, from the trainer's layer table (or, for a
    --script comparison with a version before it, from its layer constants)."""
    if hasattr(tg, "LAYERS"):
        return [(layer.window, layer.attention == "paired") for layer in tg.LAYERS if layer.attention]
    return [("long" if i in tg.LONG_LAYERS else "short", i in tg.PAIRED_LAYERS) for i in range(11)
            if i != tg.NO_ATTN_LAYER]


def step_flops(model, args, batches, step) -> float:
    """6 * (matmul params) per token plus attention over the actual windows (fwd + bwd);
    batches: (tokens T, cu_seqlens) of each of the step's micro-batches."""
    n_matmul = sum(p.numel() for p in model.parameters() if p.label in ("attn", "mlp_fc", "mlp_proj", "lm_head"))
    short, long = tg.windows_at(step, args)
    d, bs = args.model_dim, args.block_size
    total = 0.0
    for T, cu in batches:
        total += 6 * n_matmul * T
        for window, paired in attention_layers():
            w = (long if window == "long" else short) * bs
            if paired:  # 2T positions of half the heads
                pairs = attended_keys(2 * cu, 2 * T, w) / 2
            else:
                pairs = attended_keys(cu, T, w)
            total += 12 * pairs * d  # QK^T and PV, 2 FLOPs per multiply-add, x3 for backward
    return total


def stage_starts(args) -> list[int]:
    """First step of stages 1, 2, 3 and of the extension, as train_gpt's schedule defines them."""
    steps = range(tg.total_steps(args) + 1)  # + 1: step S starts the extension even with E = 0
    return [min(s for s in steps if tg.stage(s, args) == k) for k in range(4)]


def bench_training(args, plan, steps_per_stage, profile=False):
    device = plan.device
    trainer = tg.Trainer(args, 0, 1, plan, print)
    next_batches = trainer.next_batches

    def recording(batch_size):  # keep each step's micro-batch shapes for the FLOP count
        batches = next_batches(batch_size)
        trainer.last_batches = [(inputs.numel(), cu) for inputs, _, cu in batches]
        return batches

    trainer.next_batches = recording
    t0 = time.perf_counter()
    if trainer.forward is not trainer.model and args.warmup:
        trainer.warmup()
    trainer.sync()
    print(f"compile + warm-up: {time.perf_counter() - t0:.1f}s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stage_steps = stage_starts(args)
    names = ["stage 1", "stage 2", "stage 3", "extension"]
    results = []
    prof = None
    trainer.restart_data()
    for name, first in zip(names, stage_steps):
        # two untimed steps settle the stage: its new shapes and windows, and at the split
        # step (the first of stage 3) the untied embedding that the step after it uses;
        # without the warm-up this is where each stage compiles
        t = time.perf_counter()
        for s in (first, first + 1):
            trainer.train_step(s)
        trainer.sync()
        settle = time.perf_counter() - t
        t = time.perf_counter()
        shapes = []
        for s in range(first + 2, first + 2 + steps_per_stage):
            trainer.train_step(s)
            shapes.append((s, trainer.last_batches))
        trainer.sync()
        ms = 1000 * (time.perf_counter() - t) / steps_per_stage
        # counted after the clock stops: the count reads cu_seqlens, which waits for the GPU
        flops = sum(step_flops(trainer.model, args, batches, s) for s, batches in shapes)
        results.append((name, first, settle, ms, tg.batch_size_at(first, args), flops / steps_per_stage))
        last = first + 1 + steps_per_stage
        if profile and name == "stage 3":
            prof = profile_steps(trainer, [last + 1, last + 2])
    print(f"{'stage':>10} {'batch':>8} {'windows':>8} {'settle s':>9} {'ms/step':>9} {'ms/step/8':>10} "
          f"{'tokens/s':>11} {'MFU':>6}")
    for name, first, settle, ms, tokens, flops in results:
        mfu = flops / (ms / 1000) / H100_BF16_FLOPS
        print(f"{name:>10} {tokens:>8} {str(tg.windows_at(first, args)):>8} {settle:>9.1f} {ms:>9.1f} "
              f"{ms / 8:>10.2f} {tokens / (ms / 1000):>11.0f} {100 * mfu:>5.1f}%")
    if prof is not None:
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print("top kernels of two stage-3 steps:")
        print(prof.key_averages().table(sort_by=key, row_limit=20))
    ok = check_no_sync(trainer, last + 1)  # the extension continued: no new shape or window
    if device.type == "cuda":
        print(f"peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
              f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
    consumed = all(p.grad is None for p in trainer.model.parameters() if p.label in ("attn", "mlp_fc", "mlp_proj"))
    print(f"[{'PASS' if consumed else 'FAIL'}] optimizer steps ran (Muon grads consumed)")
    return ok and consumed


def profile_steps(trainer, steps):
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for s in steps:
            trainer.train_step(s)
        trainer.sync()
    return prof


def check_no_sync(trainer, step) -> bool:
    """Runs one training step under CUDA's sync debug mode. A host-device synchronization in
    the step (a blocking copy, .item(), a data-dependent shape) makes the CPU wait for the GPU,
    which then idles while Python prepares the next kernels."""
    if trainer.device.type != "cuda":
        print("[SKIP] host-device syncs in a training step: need CUDA")
        return True
    trainer.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    trainer.sync()
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    print(f"[{'FAIL' if syncs else 'PASS'}] host-device syncs in training step {step}: {len(syncs)}"
          + (f" (at {', '.join(where)})" if where else ""))
    return not syncs


def check_plan(plan) -> bool:
    """One line per fast path the plan checked: dropped paths fail here (the trainer would
    fall back; a benchmark should know)."""
    for proof in plan.proofs:
        worst = f"largest error {proof.worst[0]} {proof.worst[1]:.2e} (tolerance {proof.worst[2]:.0e})" \
            if proof.errors else proof.why
        print(f"[{'PASS' if proof.ok else 'FAIL'}] {proof.path}: {worst if proof.ok else proof.why}")
    if plan.attn_backend == "sdpa":
        print("[PASS] attention sdpa: the reference backend (nothing to prove)")
    return all(proof.ok for proof in plan.proofs)


def check_fused_kernels(plan, args) -> bool:
    """The fused loss head and MLP (train_gpt 2d, 2e) against float64 and the unfused paths
    (tools/fused_kernels_check.py, record shapes included), then ms per forward + backward
    of each path at every stage's shapes (train_gpt.time_paths, as the plan times them)."""
    ok, why = tg.triton_available(tg.Machine.of(plan.device), "fused kernels")
    if not ok or not plan.cuda:
        print(f"[SKIP] fused loss head and MLP at the record's shapes: {why or 'need CUDA'}")
        return True
    import subprocess
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "fused_kernels_check.py")],
                         capture_output=True, text=True)
    print(res.stdout, end="")
    good = res.returncode == 0
    print(f"[{'PASS' if good else 'FAIL'}] fused loss head and MLP vs float64 and the unfused paths")
    V, device = tg.next_multiple_of_n(args.vocab_size, 128), plan.device
    for name, first in zip(["stage 1", "stage 2", "stage 3", "extension"], stage_starts(args)):
        T = tg.batch_size_at(first, args) // tg.VIRTUAL_RANKS
        K = len(tg.mtp_weights(first, args))
        inputs = tg.mlp_inputs(T, args.model_dim, device, plan.act_dtype)
        timed = [("MLP", tg.time_paths({"fused": tg.timed_fwd_bwd(tg.fused_mlp, inputs), "unfused": tg.timed_fwd_bwd(
            tg.maybe_compile(tg.unfused_mlp, plan.compile), inputs)}, plan.sync))]
        if plan.fp8:  # the fused head is the FP8 head's
            x, w, targets, weights = tg.head_inputs(T, args.model_dim, V, K, device)
            forms = tg.loss_head_forms(x, w, targets, weights, 1 / tg.VIRTUAL_RANKS, plan.compile)
            timed.append((f"loss head (K={K})", tg.time_paths(
                {path: tg.timed_fwd_bwd(fn, (x, w)) for path, fn in forms.items()}, plan.sync)))
        for what, times in timed:
            unfused_ms = times["unfused"][0]
            shown = ", ".join(f"{p} {ms:.3f} ms ({unfused_ms / ms:.2f}x)" for p, (ms, _) in times.items()
                              if p != "unfused")
            print(f"{what} fwd+bwd {name} (T={T}): {shown}, unfused {unfused_ms:.3f} ms")
    return good


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of 2 stage-3 steps")
    parser.add_argument("--data", default="", help="folder with *_train_*/*_val_* shards (default: synthetic)")
    ns, rest = parser.parse_known_args()
    args = tg.parse_args(rest)
    starts = stage_starts(args)
    shortest = min(b - a for a, b in zip(starts, starts[1:]))
    if not 1 <= ns.steps <= shortest - 4:  # 2 settle steps, the timed ones, 2 profiled ones
        parser.error(f"--steps={ns.steps}: the shortest stage of --num_scheduled_iterations="
                     f"{args.num_scheduled_iterations} has {shortest} steps, so use 1 to {shortest - 4}")
    if not any(a.startswith("--grad_sum_dtype") for a in rest):
        args.grad_sum_dtype = "param"  # as on each of 8 GPUs: no fp32 sums over micro-batches
    device = tg.resolve_device(args.device)
    print(tg.environment_report().splitlines()[1], "on", torch.cuda.get_device_name() if device.type == "cuda" else "CPU")
    try:
        plan = tg.resolve_plan(args, device, 0, 1, log=print)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        if ns.data:
            folder = Path(ns.data)
            args.train_files, args.val_files = str(folder / "*_train_*.bin"), str(folder / "*_val_*.bin")
        elif args.preset != "tiny":
            folder = Path(tmp)
            need = 4 * (ns.steps + 4) * max(args.train_batch_sizes) * 3
            t = time.perf_counter()
            write_synthetic_shards(folder, need, args.val_tokens + 1)
            print(f"synthetic shards: {need:,} train tokens in {time.perf_counter() - t:.1f}s")
            args.train_files, args.val_files = str(folder / "synth_train_*.bin"), str(folder / "synth_val_*.bin")
        results = [check_plan(plan), check_fused_kernels(plan, args), bench_training(args, plan, ns.steps, ns.profile)]
    print("ALL CHECKS PASSED" if all(results) else "SOME CHECKS FAILED")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
