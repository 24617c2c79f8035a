"""The sm90 kernel report: every Triton kernel of train_gpt.py, every config, compiled for an
H100 as a launch at the record's shapes compiles it, on any machine (no GPU needed).

    python tools/kernel_report.py             # the table below, for the record's shapes
    python tools/preflight.py --sm90          # the same

A GPU launch specializes a kernel's arguments: pointers are 16-byte aligned, integers that
are multiples of 16 are marked so, and integers equal to 1 (unit strides) become constants.
Compiled without that, Triton cannot see that rows are contiguous: its loads are scalar and
its matmul loops are not pipelined, so registers and spills are not the GPU's. Here each
kernel is compiled with the specializations the record's stage-3 shapes give (launches()
states them), by Triton's own compiler for sm90, and the report reads:
- registers per thread, spilled bytes (stack and local memory) from the cubin, through the
  cuobjdump that ships with Triton; shared memory from the compile;
- blocks and warps per SM from those (H100: 64K registers allocated 256 per warp, 228 KB
  of shared memory with 1 KB reserved per block, 64 warps, 32 blocks);
- whether the loads are asynchronous (cp.async or TMA in the PTX: the main loop is
  software-pipelined over num_stages buffers);
- special-function ops per output element: ex2, lg2, rcp, rsqrt, sqrt, tanh, sin, cos and
  the divisions (div.full / div.rn / div.approx) in the PTX, those inside a loop counted
  once per trip, divided by the output elements a thread computes;
- bytes of loads in flight per SM (blocks x what one block has requested and not yet
  used: num_stages - 1 loop trips when pipelined, one otherwise), against the bytes
  Little's law says the H100 needs to keep its bandwidth busy (bandwidth per SM x DRAM
  latency; MEMORY_LATENCY_S below is an assumption, not a measurement).
Triton 3.9 here, 3.6 on the GPU image we have seen: the figures are indicative.
"""
from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import train_gpt as tg  # noqa: E402

H100 = bench.H100_SXM
MEMORY_LATENCY_S = 800e-9  # assumed DRAM latency under load (an H100 idle is ~500-600 ns)
BYTES_IN_FLIGHT_NEEDED = H100["bandwidth"] / H100["sms"] * MEMORY_LATENCY_S  # per SM, by Little's law
SFU_OPS = ("ex2", "lg2", "rcp", "rsqrt", "sqrt", "tanh", "sin", "cos", "div.full", "div.rn", "div.approx")
_SFU_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(" + "|".join(re.escape(op) for op in SFU_OPS) + r")\.", re.M)
_LABEL_RE = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH_RE = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
SPILL_ALLOWED = 8  # bytes per thread of stack and local memory: "a few"


@dataclass
class Launch:
    """A kernel as the record's shapes launch it: the JIT function, each runtime argument's
    type and value at that launch (pointers: None), constexprs that are not tile sizes, and
    per config (meta): output elements per program, loop trips per program, bytes a program
    loads per trip."""
    family: str
    jit: object
    configs: list  # (meta dict, num_warps, num_stages)
    types: dict
    values: dict
    consts: dict = field(default_factory=dict)
    elements: Callable = None
    trips: Callable = None
    loads: Callable = None

    def specialized(self):
        """(constexprs, names marked divisible by 16): unit integers become constants,
        pointers are aligned, integers that are multiples of 16 are marked."""
        consts = dict(self.consts)
        divisible = []
        for name, typ in self.types.items():
            value = self.values.get(name)
            if typ.startswith("*"):
                divisible.append(name)
            elif value == 1 and typ.startswith("i"):
                consts[name] = 1
            elif isinstance(value, int) and value % 16 == 0:
                divisible.append(name)
        return consts, divisible


def _configs(kernel) -> list:
    """(meta, num_warps, num_stages) of an autotuned kernel's configs."""
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kernel.configs]


def _jit(kernel):
    return getattr(kernel, "fn", kernel)  # the autotuner wraps the JIT function


def record_shapes(args=None) -> dict:
    """The stage-3 micro-batch of rank 0 of 8: tokens T, padded vocabulary V, width d."""
    args = args or tg.parse_args([])
    return dict(T=max(args.train_batch_sizes) // tg.VIRTUAL_RANKS, V=tg.next_multiple_of_n(args.vocab_size, 128),
                d=args.model_dim)


def launches(shapes: dict | None = None) -> list[Launch]:
    """Every Triton kernel family of train_gpt at the record's shapes (row-major tensors,
    unit inner strides), or [] without Triton."""
    if tg.triton is None:
        return []
    s = shapes or record_shapes()
    T, V, d = s["T"], s["V"], s["d"]
    H, P = 4 * d, -(-V // getattr(tg, "LSE_COLUMNS", 64))
    out = []
    loss_types = dict(x_in="*fp16", targets="*i64", weights="*fp32", partial="*fp32", loss_out="*fp32",
                      g_out="*fp8e5", gt_out="*fp8e5", scale_ptr="*fp32", T="i32", V="i32", P="i32")
    has = lambda *names: all(hasattr(tg, n) for n in names)  # noqa: E731  (an older --script lacks some)
    for one_pass in ((True, False) if has("_mtp_loss_grad_kernel") else ()):
        types = dict(loss_types, x_in="*fp16" if one_pass else "*bf16")
        out.append(Launch(
            f"loss kernel ({'one pass' if one_pass else 'two passes'})", _jit(tg._mtp_loss_grad_kernel),
            _configs(tg._mtp_loss_grad_kernel), types, dict(T=T, V=V, P=P if one_pass else 0),
            consts=dict(ONE_PASS=one_pass),
            # trips V / BLOCK_V, not rounded up: ops per element computed, a row's masked tail left out
            elements=lambda m, V=V: m["BLOCK_T"] * V, trips=lambda m, V=V: V / m["BLOCK_V"],
            loads=lambda m: 2 * m["BLOCK_T"] * m["BLOCK_V"]))
    mm = dict(M="i32", N="i32", K="i32", stride_xm="i32", stride_xk="i32", stride_wn="i32", stride_wk="i32")
    tile = dict(elements=lambda m: m["BLOCK_M"] * m["BLOCK_N"], trips=lambda m, K=d: -(-K // m["BLOCK_K"]))
    out += [] if not has("_fp8_logits_kernel") else [Launch(
        "one-pass FP8 matmul", _jit(tg._fp8_logits_kernel), _configs(tg._fp8_logits_kernel),
        dict(X="*fp8e4nv", W="*fp8e4nv", OUT="*fp16", PARTIAL="*fp32", **mm, scale="fp32"),
        dict(M=T, N=V, K=d, stride_xm=d, stride_xk=1, stride_wn=d, stride_wk=1),
        consts=dict(LSE_COLS=tg.LSE_COLUMNS), **tile,
        loads=lambda m: (m["BLOCK_M"] + m["BLOCK_N"]) * m["BLOCK_K"])]
    mlp = (("MLP matmul, forward", "_mlp_fwd_kernel", False), ("MLP matmul, backward", "_mlp_bwd_kernel", True))
    for name, kernel, backward in (mlp if has("_mlp_fwd_kernel", "_mlp_bwd_kernel") else ()):
        kernel = getattr(tg, kernel)
        out.append(Launch(
            name, _jit(kernel), _configs(kernel),
            dict(X="*bf16", W="*bf16", H="*bf16", OUT="*bf16", **mm, stride_om="i32", stride_on="i32"),
            dict(M=T, N=H, K=d, stride_xm=d, stride_xk=1, stride_wn=d, stride_wk=1, stride_om=H, stride_on=1),
            consts=dict(BACKWARD=backward), **tile,
            loads=lambda m: 2 * (m["BLOCK_M"] + m["BLOCK_N"]) * m["BLOCK_K"]))
    # Polar Express on the MLP bank's (d, 4d) matrices: A (B, d, 4d) for X X^T, (B, d, d) for b A + c A A
    sym_types = dict(A="*bf16", C="*bf16", M="i32", K="i32", stride_ab="i32", stride_am="i32", stride_ak="i32",
                     stride_cb="i32", stride_cm="i32", stride_cn="i32")
    sym = (("symmetric X X^T", "_xxt_kernel", H, {}),
           ("symmetric b A + c A A", "_ba_plus_caa_kernel", d, dict(coef_b="fp32", coef_c="fp32")))
    for name, kernel, K, extra in (sym if has("_xxt_kernel", "_ba_plus_caa_kernel") else ()):
        kernel = getattr(tg, kernel)
        out.append(Launch(
            name, _jit(kernel), _configs(kernel), dict(sym_types, **extra),
            dict(M=d, K=K, stride_ab=d * K, stride_am=K, stride_ak=1, stride_cb=d * d, stride_cm=d, stride_cn=1),
            elements=lambda m: m["BLOCK_M"] ** 2, trips=lambda m, K=K: -(-K // m["BLOCK_K"]),
            loads=lambda m: 2 * 2 * m["BLOCK_M"] * m["BLOCK_K"]))
    return out


def compile_sm90(jit, types: dict, consts: dict, divisible=(), num_warps: int = 4, num_stages: int = 3):
    """Triton's compile of `jit` for sm90 (no GPU): `types` of the runtime arguments, `consts`
    the constexprs, `divisible` the arguments marked as multiples of 16 (pointers: aligned)."""
    import triton
    from triton.backends.compiler import GPUTarget

    names = jit.arg_names
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n not in consts}
    src = triton.compiler.ASTSource(fn=jit, signature=sig, attrs=attrs,
                                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                num_stages=num_stages))


def cubin_resources(cubin: bytes) -> dict:
    """REG, STACK and LOCAL of the cubin's kernel, from `cuobjdump -res-usage` (Triton's)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump -res-usage printed no register count: {text[-300:]!r}")
    return dict(regs=int(found["REG"]), stack=int(found.get("STACK", 0)), local=int(found.get("LOCAL", 0)))


def blocks_per_sm(regs: int, shared: int, num_warps: int) -> tuple[int, str]:
    """(blocks of this kernel an H100 SM holds at once, the resource that limits it)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = dict(registers=(H100["regs_per_sm"] // regs_per_warp) // num_warps,
                  shared=H100["shared_per_sm"] // (shared + H100["shared_reserved"]),
                  warps=H100["warps_per_sm"] // num_warps, blocks=H100["blocks_per_sm"])
    what = min(limits, key=limits.get)
    return limits[what], what


def loop_lines(ptx: str) -> list[bool]:
    """For each line of the PTX, whether it lies inside a loop (between a label and a later
    branch back to it)."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL_RE.match(line)
        if m:
            labels[m.group(1)] = i
    inside = [False] * len(lines)
    for i, line in enumerate(lines):
        m = _BRANCH_RE.search(line)
        if m and labels.get(m.group(1), i + 1) <= i:
            for j in range(labels[m.group(1)], i + 1):
                inside[j] = True
    return inside


def sfu_counts(ptx: str) -> tuple[int, int]:
    """(special-function instructions outside loops, inside loops) in the PTX."""
    inside = loop_lines(ptx)
    lines = ptx.splitlines()
    outside_n = inside_n = 0
    for i, line in enumerate(lines):
        if _SFU_RE.match(line):
            if inside[i]:
                inside_n += 1
            else:
                outside_n += 1
    return outside_n, inside_n


def asynchronous_loads(ptx: str) -> bool:
    """Whether the kernel loads through cp.async or TMA (the software-pipelined form)."""
    return "cp.async" in ptx


@dataclass
class Figures:
    """One config of one kernel family, compiled for sm90 at the record's shapes."""
    family: str
    config: str
    num_warps: int
    num_stages: int
    regs: int
    spilled: int  # bytes of stack + local memory per thread
    shared: int
    blocks: int
    limit: str
    pipelined: bool
    sfu_per_element: float
    in_flight: int  # bytes of loads in flight per SM
    ptx: str = field(default="", repr=False)

    @property
    def warps(self) -> int:
        return self.blocks * self.num_warps

    @property
    def latency_hidden(self) -> float:
        """Bytes in flight over what the H100 needs (1 or more: its bandwidth is reachable)."""
        return self.in_flight / BYTES_IN_FLIGHT_NEEDED


def figures_of(launch: Launch, meta: dict, num_warps: int, num_stages: int) -> Figures:
    consts, divisible = launch.specialized()
    out = compile_sm90(launch.jit, launch.types, {**consts, **meta}, divisible, num_warps, num_stages)
    res = cubin_resources(out.asm["cubin"])
    ptx = out.asm["ptx"]
    threads = 32 * num_warps
    outside, inside = sfu_counts(ptx)
    per_element = (outside + inside * launch.trips(meta)) * threads / launch.elements(meta)
    blocks, limit = blocks_per_sm(res["regs"], out.metadata.shared, num_warps)
    pipelined = asynchronous_loads(ptx)
    in_flight = blocks * launch.loads(meta) * (max(num_stages - 1, 1) if pipelined else 1)
    config = ", ".join(f"{k}={v}" for k, v in meta.items()) + f", warps={num_warps}, stages={num_stages}"
    return Figures(launch.family, config, num_warps, num_stages, res["regs"], res["stack"] + res["local"],
                   out.metadata.shared, blocks, limit, pipelined, per_element, in_flight, ptx)


@functools.lru_cache(maxsize=None)
def family_figures(family: str) -> tuple[Figures, ...]:
    """Every config of one kernel family at the record's shapes (compiled once per process)."""
    launch = next((l for l in launches() if l.family == family), None)
    if launch is None:
        raise LookupError(f"train_gpt has no Triton kernel {family!r}")
    return tuple(figures_of(launch, *cfg) for cfg in launch.configs)


def can_compile() -> str:
    """'' if Triton can compile for sm90 here, else why not."""
    if tg.triton is None:
        return "no Triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 (the interpreter replaces the compiler)"
    import triton
    if "nvidia" not in triton.backends.backends:
        return "this Triton has no NVIDIA backend"
    return ""


def report_lines(all_figures) -> list[str]:
    head = (f"{'config':<58} {'regs':>4} {'spill':>5} {'shared':>7} {'blocks/SM':>13} {'warps':>5} "
            f"{'async':>5} {'SFU/elem':>8} {'in flight':>12}")
    lines = []
    for family, figs in all_figures:
        lines += [f"{family}:", "  " + head]
        for f in figs:
            lines.append(f"  {f.config:<58} {f.regs:>4} {f.spilled:>5} {f.shared / 1024:>5.0f}KB "
                         f"{f.blocks:>3} ({f.limit[:9]:<9}) {f.warps:>5} {'yes' if f.pipelined else 'no':>5} "
                         f"{f.sfu_per_element:>8.2f} {f.in_flight / 1024:>5.0f}KB ({f.latency_hidden:.1f}x)")
    return lines


def main(argv=None) -> int:
    why = can_compile()
    if why:
        print(f"kernel report: cannot compile for sm90 here: {why}", file=sys.stderr)
        return 2
    s = record_shapes()
    print(f"sm90 compiles at the record's stage-3 shapes (T={s['T']}, V={s['V']}, d={s['d']}), with the launch "
          f"specializations; H100 per SM: {H100['regs_per_sm'] // 1024}K registers, {H100['shared_per_sm'] // 1024} KB "
          f"shared, {H100['warps_per_sm']} warps; loads in flight needed per SM: {BYTES_IN_FLIGHT_NEEDED / 1024:.0f} KB "
          f"({H100['bandwidth'] / 1e12:.2f} TB/s / {H100['sms']} SMs x {MEMORY_LATENCY_S * 1e9:.0f} ns assumed latency)",
          flush=True)
    rows = []
    for launch in launches(s):
        rows.append((launch.family, family_figures(launch.family)))
        for line in report_lines(rows[-1:]):
            print(line, flush=True)
    print("SFU/elem: special-function ops (ex2, lg2, rcp, rsqrt, sqrt, tanh, sin, cos, divisions) per output "
          "element; async: cp.async/TMA loads (a pipelined main loop); in flight: bytes of loads per SM "
          "(and over the need)")
    problems = [f"{f.family} [{f.config}]: {f.spilled} B spilled" for _, figs in rows for f in figs
                if f.spilled > SPILL_ALLOWED]
    problems += [f"{f.family} [{f.config}]: main loop not pipelined" for _, figs in rows for f in figs
                 if ("matmul" in f.family or "symmetric" in f.family) and not f.pipelined]
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
