"""Preflight: check on any machine, without a GPU, that the compiled training step is lean.

    python tools/preflight.py                   # the record configuration (8x H100 run, rank 0)
    python tools/preflight.py --preset tiny     # the same checks at the tiny size (CI runs this)
    python tools/preflight.py --kernels         # also inductor's fused kernel count (slow: minutes)
    python tools/preflight.py --roofline --script=OTHER/train_gpt.py   # modelled step times, this vs OTHER
    python tools/preflight.py --sm90            # the Triton kernels' sm90 compiles (tools/kernel_report.py)

A record attempt costs a rented GPU node and ~7 minutes of compiling; an edit that breaks
the graph, recompiles in the timed run or makes the CPU wait for the GPU shows up here
first. What it does:

- builds the model and both optimizers on the `meta` device (no memory, no data math) as
  rank 0 of 8 (a fake process group), with the plan a GPU rank makes where every fast path
  is proven and faster (train_gpt.assumed_gpu_plan): bf16 activations, the FP8 lm_head,
  bf16 Polar Express, compiled, and the attention backend replaced by a stand-in op with
  the signature of the FlashAttention-3 / varlen kernels;
- runs the exact warm-up (every step and validation the trainer's warm-up runs), then the
  timed run's sequence of states: the first steps of every stage, the embed split, the
  extension and the final validation, through torch.compile(fullgraph=True) with a
  backend that records the graphs instead of generating code;
- prints: graphs compiled, graph breaks (fullgraph raises them), recompiles in the timed
  run, host-device syncs per training step (an `.item()`, a blocking host-to-device copy
  such as a tensor built from Python values on the device, a data-dependent shape),
  operations per training micro-batch (forward and backward graphs) and per optimizer
  step (even / odd; eager kernels plus compiled graphs), the (T, V)-sized buffers the
  loss backward writes (from inductor's code for the loss head), FLOPs per step and the
  MFU a step time implies (--step_ms, default the record's 33.2 / 61.0 / 87.6 ms);
- with --roofline: the (T, V) traffic of the loss head and the (T, 4d) traffic of an MLP
  per micro-batch, the tensors they keep for the backward, and a roofline model of the
  step time per stage on an H100 SXM (see "The roofline model" below); with --script too,
  the same for the other script in a child process, then the ratios.

The fused loss head (in its one-pass form) and MLP are traced as a GPU run takes them where
they are faster (--fused_loss=off / --fused_mlp=off trace the unfused paths).

Exit status 1 on a graph break, a recompile in the timed run, a sync in a training step
or an fp32 / second (T, V) buffer in the loss backward; 0 otherwise. Extra flags are
Hyperparameters overrides (see train_gpt.py --help).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import operator
import os
import re
import sys
import tempfile
from collections import Counter
from typing import NamedTuple
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COMPARED_ENV = "PREFLIGHT_COMPARED"  # set in the --roofline --script child: it checks the other script


def _import_trainer():
    """train_gpt.py of this repository, or the file given by --script=PATH (to compare an
    edit with an earlier version: the same checks on both)."""
    script = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--script=")), None)
    if "--roofline" in sys.argv[1:] and not os.environ.get(COMPARED_ENV):
        script = None  # --roofline --script=OTHER: this one here, OTHER in a child process
    if script is None:
        import train_gpt
        return train_gpt
    spec = importlib.util.spec_from_file_location("train_gpt", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = module
    spec.loader.exec_module(module)
    return module


tg = _import_trainer()

_spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench
_spec.loader.exec_module(bench)
sys.path.insert(0, str(REPO / "tools"))
import kernel_report  # noqa: E402  (imports train_gpt: the module above, this script's or --script's)

RECORD_STEP_MS = (33.2, 61.0, 87.6)  # the record's ms per step in the three batch stages (its logs)
aten = torch.ops.aten

# --------------------------------------------------------------------------------------
# The attention kernels, as ops of their signature (the preflight never runs real math)
# --------------------------------------------------------------------------------------


@torch.library.custom_op("preflight::varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, window: int, scale: float) -> torch.Tensor:
    raise NotImplementedError("a stand-in for the GPU attention kernels: shapes only")


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, window, scale):
    return torch.empty_like(q)


@torch.library.custom_op("preflight::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens: torch.Tensor, max_seqlen: int, window: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError("a stand-in for the GPU attention kernels: shapes only")


@varlen_attention_backward.register_fake
def _(grad, q, k, v, cu_seqlens, max_seqlen, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, window, scale = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.args = (max_seqlen, window, scale)


def _attention_backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward(grad, q, k, v, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None


varlen_attention.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention_stand_in(q, k, v, cu_seqlens, max_seqlen, window, scale):
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, window, scale)


# --------------------------------------------------------------------------------------
# Instruments
# --------------------------------------------------------------------------------------

# ops that only make views or read metadata: no kernel on a GPU
VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
            aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.default, aten.select.int, aten.slice.Tensor, aten.as_strided.default,
            aten.detach.default, aten.alias.default, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
            aten.view_as_real.default, aten.lift_fresh.default, aten.empty.memory_format,
            aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default, aten.sym_size.int,
            aten.sym_stride.int, aten.sym_numel.default, aten.is_same_size.default, aten.diagonal.default,
            aten.narrow.default, aten._reshape_alias.default, aten.mT.default if hasattr(aten, "mT") else None}
VIEW_OPS.discard(None)


def _device_of(x):
    return x.device.type if isinstance(x, torch.Tensor) else None


class DeviceOps(TorchDispatchMode):
    """Counts, while active, the operations that would be kernels on the device, and the
    host-device syncs: `.item()` / `_local_scalar_dense`, a data-dependent shape (`nonzero`
    and friends) on the device, and a blocking host-to-device copy (a copy from a host tensor
    without non_blocking: e.g. torch.tensor(..., device=cuda) or x.new_tensor(v))."""

    SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor}

    def __init__(self, recorder: GraphRecorder, device: str = "meta"):
        super().__init__()
        self.recorder, self.device = recorder, device
        self.kernels = 0
        self.ops = Counter()
        self.syncs = []
        self.records = []  # a roofline Kernel per counted op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.recorder.in_graph:  # a compiled graph's op: counted from the graph
            return out
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        on_device = any(_device_of(x) == self.device for x in flat) or any(
            _device_of(x) == self.device for x in torch.utils._pytree.tree_leaves(out))
        if func in self.SYNC_OPS and on_device:
            self.syncs.append(str(func))
        if func in (aten._to_copy.default, aten.copy_.default) and on_device:
            src = args[1] if func is aten.copy_.default else args[0]
            non_blocking = kwargs.get("non_blocking", args[2] if func is aten.copy_.default and len(args) > 2 else False)
            if _device_of(src) == "cpu" and not non_blocking:
                self.syncs.append(f"{func} (blocking host-to-device copy of {tuple(src.shape)})")
        if on_device and func not in VIEW_OPS:
            self.kernels += 1
            self.ops[str(func.overloadpacket)] += 1
            tensors = [x for x in flat if isinstance(x, torch.Tensor)]
            if "c10d" in str(func):  # communication: not in the roofline model
                return out
            k = Kernel(str(func), read=[_size(t) for t in tensors], written=[_size(out)],
                       sfu=sfu_of(func, list(args), out))
            if func in MATMUL_OPS:
                k.flops, k.operands, k.read = _matmul_flops(func, list(args)), k.read, []
            self.records.append(k)
        return out


class GraphRecorder:
    """A torch.compile backend that records the forward and backward graphs AOTAutograd
    makes (and runs them op by op on the meta tensors) instead of generating code."""

    def __init__(self):
        self.phase = "warm-up"
        self.compiles = Counter()
        self.graphs = []  # (name, phase, kind, fx graph)
        self.calls = []  # (name, kind, index into graphs) while recording calls
        self.items = 0  # .item() reads of meta tensors
        self.in_graph = 0  # > 0 while a recorded graph runs
        self.host_values = 0  # tensors built from Python values on the device

    def backend_for(self, name: str):
        from torch._dynamo.backends.common import aot_autograd

        def record(kind):
            def compiler(gm, example_inputs):
                index = len(self.graphs)
                self.graphs.append((name, self.phase, kind, gm))

                def run(args):
                    self.calls.append((name, kind, index))
                    self.in_graph += 1
                    try:
                        return gm(*args)
                    finally:
                        self.in_graph -= 1
                run._boxed_call = True
                return run
            return compiler

        def backend(gm, example_inputs):
            self.compiles[(name, self.phase)] += 1
            return aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward"))(gm, example_inputs)

        return backend


def graph_ops(gm) -> int:
    """Operations of an FX graph that would be kernels unfused (views excluded)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target not in VIEW_OPS
               and not str(n.target).startswith("<built-in"))


# --------------------------------------------------------------------------------------
# The roofline model (--roofline) and the loss head's (T, V) traffic
# --------------------------------------------------------------------------------------
# A model, not a measurement: each kernel of a step takes max(FLOPs / peak, bytes moved /
# bandwidth, special-function ops / their rate, a floor per kernel) at the efficiencies
# below, and the step is their sum. Kernels come from the graphs torch.compile records
# (forward and backward of a micro-batch, the compiled optimizer pieces) and the optimizer's
# eager ops. A matmul, an attention call or a hand-written kernel is one kernel; a custom op
# of train_gpt is expanded into the ops of its body (compiled on CUDA); the elementwise and
# reduction ops between them fuse, as inductor fuses them, into one kernel per connected
# group that no such kernel separates. A kernel reads each tensor it gets from another kernel
# (or the graph's inputs) once and writes each tensor it hands on once. Special functions
# (SFU_PER_ELEMENT: exp, log, sigmoid as exp plus reciprocal, rsqrt, sqrt, tanh, a division
# by a tensor) are counted per output element of an inductor kernel's ops, and for a Triton
# kernel of train_gpt from its sm90 PTX (tools/kernel_report.py). A Triton kernel is also
# priced by what its compile shows (its best config, as its autotuner would pick): with
# fewer loads in flight per SM than Little's law needs to hide the memory latency, its
# bandwidth is derated by that fraction; with one block per SM a matmul's epilogue cannot
# overlap another block's main loop, so its special functions add to the matmul instead of
# overlapping it. Communication is not modelled.
H100_SXM = bench.H100_SXM  # one definition of the peaks, in tools/bench.py
ROOFLINE_EFFICIENCY = dict(matmul=0.75, attention=0.6, bandwidth=0.85, min_kernel_us=2.0)
MATMUL_OPS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten._scaled_mm.default}
ATTENTION_FLOPS = {"preflight::varlen_attention": 4.0, "preflight::varlen_attention_backward": 10.0}  # per pair, dim
SFU_PER_ELEMENT = {aten.exp.default: 1, aten.exp2.default: 1, aten.log.default: 1, aten.log2.default: 1,
                   aten.sigmoid.default: 2, aten.tanh.default: 1, aten.rsqrt.default: 1, aten.sqrt.default: 1,
                   aten.reciprocal.default: 1, aten.sin.default: 1, aten.cos.default: 1, aten.log1p.default: 1,
                   aten.expm1.default: 1, aten._softmax.default: 2, aten._log_softmax.default: 1}
KINDS = ("matmul", "attention", "memory-bound", "transcendental-bound", "optimizer")
# the train_gpt custom ops that are one Triton kernel, and their family in tools/kernel_report.py
TRITON_FAMILIES = {"train_gpt::fp8_sigmoid_lse": "one-pass FP8 matmul",
                   "train_gpt::mlp_up_relu2": "MLP matmul, forward",
                   "train_gpt::mlp_down_relu2_grad": "MLP matmul, backward"}


def sfu_of(target, vals, out) -> float:
    """Special-function ops an aten op does: SFU_PER_ELEMENT per output element; a division
    by a tensor one per element (a Python number becomes a multiply)."""
    n = _size(out)[0]
    if target in (aten.div.Tensor, aten.div_.Tensor) and len(vals) > 1 and isinstance(vals[1], torch.Tensor):
        return float(n)
    if target is aten.pow.Tensor_Scalar and len(vals) > 1 and float(vals[1]) != int(vals[1]):
        return float(n) * (1 if abs(vals[1]) == 0.5 else 2)  # sqrt / rsqrt, else exp(log(x) y)
    return float(SFU_PER_ELEMENT.get(target, 0) * n)


@functools.lru_cache(maxsize=None)
def triton_figures(family: str):
    """The sm90 figures of a Triton kernel family (tools/kernel_report.py), or the reason
    there are none (no sm90 compiler here, or a script without that kernel)."""
    why = kernel_report.can_compile()
    if why:
        return why
    try:
        return kernel_report.family_figures(family)
    except Exception as e:  # an older --script without the kernel, a compile error
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Kernel:
    """One kernel of the model: its FLOPs, special-function ops and the (numel, bytes) of
    each tensor it reads as a matmul operand (streamed through the tensor cores), reads
    otherwise, and writes; `family`: a Triton kernel's family in the sm90 report, priced
    by its figures per output element (`elements`)."""

    def __init__(self, what, flops=0.0, fp8=False, attention=False, operands=(), read=(), written=(), sfu=0.0,
                 family=None, elements=0):
        self.what, self.flops, self.fp8, self.attention = what, flops, fp8, attention
        self.operands, self.read, self.written = list(operands), list(read), list(written)
        self.sfu, self.family, self.elements = sfu, family, elements
        self.optimizer = False

    def terms(self, figures=None) -> dict:
        """Seconds by roof: flops, bytes, sfu, floor (and serial: a matmul epilogue's special
        functions that cannot overlap its main loop) under one config's sm90 figures."""
        eff = ROOFLINE_EFFICIENCY
        peak = H100_SXM["fp8" if self.fp8 else "bf16"] * eff["attention" if self.attention else "matmul"]
        moved = sum(b for _, b in self.operands + self.read + self.written)
        bandwidth = H100_SXM["bandwidth"] * eff["bandwidth"]
        sfu = self.sfu
        serial = False
        if figures is not None:
            bandwidth *= min(1.0, figures.latency_hidden)
            sfu = figures.sfu_per_element * self.elements
            serial = self.flops > 0 and figures.blocks < 2
        t = dict(flops=self.flops / peak, bytes=moved / bandwidth, sfu=sfu / H100_SXM["sfu"],
                 floor=eff["min_kernel_us"] * 1e-6)
        if serial:
            t["flops"] += t.pop("sfu")
        return t

    def priced(self) -> tuple[float, str]:
        """(seconds, kind): a Triton kernel at its best config; the kind is optimizer,
        attention, or by its largest roof: matmul, memory-bound (the floor too) or
        transcendental-bound."""
        figs = triton_figures(self.family) if self.family else None
        options = [self.terms(f) for f in figs] if isinstance(figs, tuple) and figs else [self.terms()]
        best = min(options, key=lambda t: max(t.values()))
        if self.optimizer or self.attention:
            kind = "optimizer" if self.optimizer else "attention"
        else:
            kind = {"flops": "matmul", "sfu": "transcendental-bound"}.get(max(best, key=best.get), "memory-bound")
        return max(best.values()), kind

    def kind(self) -> str:
        return self.priced()[1]


def _size(v) -> tuple[int, int]:
    ts = [t for t in torch.utils._pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
    return sum(t.numel() for t in ts), sum(t.numel() * t.element_size() for t in ts)


def _matmul_flops(target, vals) -> float:
    if target in (aten._scaled_mm.default, aten.mm.default):
        (m, k), n = vals[0].shape, vals[1].shape[1]
    elif target is aten.addmm.default:
        (m, k), n = vals[1].shape, vals[2].shape[1]
    else:
        a, b = (vals[0], vals[1]) if target is aten.bmm.default else (vals[1], vals[2])
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 2.0 * m * n * k


def _op_name(n) -> str:
    return str(getattr(n.target, "_schema", n.target)).split("(")[0]


def _is_view(n) -> bool:
    return n.op == "call_function" and (n.target in VIEW_OPS or n.target is operator.getitem)


def _root(n):
    """The node whose memory a view (of a view ...) reads."""
    while _is_view(n):
        n = next(a for a in n.all_input_nodes)
    return n


def _alias_root(n):
    """The node a view (of a view ...) aliases; an element of a multi-output op is its own."""
    while n.op == "call_function" and n.target in VIEW_OPS:
        n = next(a for a in n.all_input_nodes)
    return n


def saved_aliases(forward_gm) -> dict:
    """Names of the forward graph's outputs that view another output's memory (autograd can
    save one tensor twice, e.g. relu's result and its detached alias): name -> the root's."""
    out = next(n for n in forward_gm.graph.nodes if n.op == "output")
    return {a.name: _alias_root(a).name for a in torch.utils._pytree.tree_leaves(out.args)
            if isinstance(a, torch.fx.Node) and _alias_root(a) is not a}


def graph_kernels(gm, attention_pairs=None, aliases=None) -> list[Kernel]:
    """The kernels of an FX graph of aten ops with meta values, by the rules above.
    attention_pairs(window, positions) -> the (query, key) pairs one attention call scores;
    aliases: a backward graph's inputs that are one tensor (saved_aliases of its forward)."""
    is_view = _is_view
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}

    def root(n):
        n = _root(n)
        return placeholders.get((aliases or {}).get(n.name), n) if n.op == "placeholder" else n

    ops = [n for n in gm.graph.nodes if n.op == "call_function" and not is_view(n) and "val" in n.meta]
    inputs = {n: [(root(a), a) for a in n.all_input_nodes] for n in ops}
    extern = {n for n in ops if n.target in MATMUL_OPS or "::" in _op_name(n) and not _op_name(n).startswith("aten::")}
    depth = {}  # how many such kernels lie on the longest path to a node
    for n in ops:
        depth[n] = max((depth.get(r, 0) + (r in extern) for r, _ in inputs[n]), default=0)
    parent = {n: n for n in ops if n not in extern}

    def group(n):
        if n not in parent:
            return n
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in parent:
        for r, _ in inputs[n]:
            if r in parent and depth[r] == depth[n]:
                parent[group(r)] = group(n)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    final = {root(a) for a in out.all_input_nodes}
    merged = True
    while merged:  # a group whose results only one later group reads is inlined into it
        merged = False
        readers = {}
        for n in ops:
            for r, _ in inputs[n]:
                if group(r) is not group(n):
                    readers.setdefault(group(r), set()).add(n if n in extern else group(n))
        for g, rs in readers.items():
            (only,) = rs if len(rs) == 1 else (None,)
            if g in parent and only in parent and not any(group(f) is g for f in final):
                parent[g] = only
                merged = True
                break
    handed_on = set()  # values some other kernel (or the graph's output) reads
    for n in ops:
        for r, via in inputs[n]:
            if group(r) is not group(n):
                handed_on.add(r)
    handed_on |= {root(a) for a in out.all_input_nodes}
    kernels, reads = {}, {}
    for n in ops:
        g = group(n)
        if n in extern:
            name = _op_name(n)
            if name.startswith("train_gpt::"):
                kernels[g] = _custom_op_kernels(n, name, attention_pairs)
                continue
            k = Kernel(name, read=[_size(via.meta["val"]) for _, via in inputs[n]], written=[_size(n.meta["val"])])
            vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in n.args]
            if n.target in MATMUL_OPS:
                k.flops, k.fp8 = _matmul_flops(n.target, vals), n.target is aten._scaled_mm.default
                k.operands, k.read = k.read, []
            elif name in ATTENTION_FLOPS and attention_pairs is not None:
                q = vals[1] if name.endswith("backward") else vals[0]
                k.flops = ATTENTION_FLOPS[name] * attention_pairs(vals[-2], q.shape[0]) * q.shape[1] * q.shape[2]
                k.attention = True
            kernels[g] = [k]
            continue
        k = kernels.setdefault(g, [Kernel("fused elementwise/reduction")])[0]
        k.sfu += sfu_of(n.target, [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in n.args],
                        n.meta["val"])
        for r, via in inputs[n]:
            size = _size(via.meta["val"])
            if group(r) is not g and (g, r, size) not in reads:  # each tensor (or part) read once
                reads[(g, r, size)] = True
                k.read.append(size)
        if n in handed_on:
            k.written.append(_size(n.meta["val"]))
    return [k for ks in kernels.values() for k in ks]


def _meta_like(v):
    """A plain meta tensor of a (fake) value's shape, strides and dtype."""
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v


def _custom_op_kernels(node, name, attention_pairs) -> list[Kernel]:
    """A train_gpt custom op: a declared hand-written kernel, or the kernels of its body."""
    vals = [_meta_like(a.meta["val"]) if isinstance(a, torch.fx.Node) else a for a in node.args]
    schema = torch._library.custom_ops.OPDEFS[name]._opoverload._schema.arguments
    vals += [node.kwargs.get(a.name, a.default_value) for a in schema[len(vals):]]  # defaulted arguments
    names = [a.name for a in schema]
    if "compiled" in names:  # the op's body as PyTorch ops, not through torch.compile
        vals[names.index("compiled")] = False
    if name == "train_gpt::mtp_loss_grad_e5m2":  # hand-written: what its code moves per (T, V) element
        numel, partial = vals[0].numel(), vals[4]
        one_pass = partial.shape[1] > 0  # given the lse's partial sums (and the sigmoids) or not
        per = tg.MTP_KERNEL_BYTES_PER_ELEMENT[one_pass]
        return [Kernel(name, read=[(numel, per["read"] * numel), _size(partial)], written=[(numel, per["write"] * numel)],
                       family=f"loss kernel ({'one pass' if one_pass else 'two passes'})", elements=numel)]
    if name in ("train_gpt::fp8_sigmoid_lse", "train_gpt::fp8_logits_lse"):  # the one-pass head's FP8 matmul
        x, w = vals[0], vals[1]
        return [Kernel(name, flops=2.0 * x.shape[0] * w.shape[0] * x.shape[1], fp8=True,
                       operands=[_size(x), _size(w)], written=[_size(v) for v in node.meta["val"]],
                       family=TRITON_FAMILIES.get(name), elements=x.shape[0] * w.shape[0])]
    if name in ("train_gpt::mlp_up_relu2", "train_gpt::mlp_down_relu2_grad"):  # x @ w^T, an epilogue
        x, w = vals[0], vals[1]
        return [Kernel(name, flops=2.0 * x.shape[0] * w.shape[0] * x.shape[1], operands=[_size(x), _size(w)],
                       read=[_size(v) for v in vals[2:]], written=[_size(node.meta["val"])],
                       family=TRITON_FAMILIES[name], elements=x.shape[0] * w.shape[0])]
    from torch.fx.experimental.proxy_tensor import make_fx

    body = torch._library.custom_ops.OPDEFS[name]._init_fn
    return graph_kernels(make_fx(body)(*vals), attention_pairs)


def tv_traffic(kernels, T: int, V: int) -> float:
    """Bytes per element that kernels move in tensors of T x V elements: every write, and
    every read but a matmul's operands (they stream through the tensor cores)."""
    return sum(b for k in kernels for n, b in k.read + k.written if n == T * V) / (T * V)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def preflight_environment(recorder: GraphRecorder, world_size: int):
    """torch.compile with the recording backend, the host-to-device copies of the CUDA
    path (pinned memory, non_blocking) and a fake process group of world_size ranks."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    real_compile, real_to_device, real_item = torch.compile, tg._to_device, torch.Tensor.item
    real_tensor, real_new_tensor = torch.tensor, torch.Tensor.new_tensor
    cpu_batches = []

    def counting(make):  # a tensor built from Python values on the device: a blocking copy on CUDA
        def build(*args, **kwargs):
            out = make(*args, **kwargs)
            if out.is_meta and not recorder.in_graph and not torch.compiler.is_compiling():
                recorder.host_values += 1
            return out
        return build

    def item(self):  # a meta tensor has no value: count the read (a sync on a GPU), return 1
        if self.is_meta:
            recorder.items += 1
            return 1.0
        return real_item(self)

    def compile_recording(fn=None, **kwargs):
        from torch.utils._python_dispatch import _disable_current_modes

        name = getattr(fn, "__name__", type(fn).__name__)
        kwargs["backend"] = recorder.backend_for(name)
        compiled = real_compile(fn, **kwargs)

        def call(*args, **kw):  # dynamo does not trace under a dispatch mode: pause the counting
            with _disable_current_modes():
                return compiled(*args, **kw)
        return call

    def to_device_like_cuda(tensors, device):
        cpu_batches.append(tuple(tensors))
        return tuple(t.to(device, non_blocking=True) for t in tensors)

    torch.compile, tg._to_device, torch.Tensor.item = compile_recording, to_device_like_cuda, item
    torch.tensor, torch.Tensor.new_tensor = counting(real_tensor), counting(real_new_tensor)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield cpu_batches
    finally:
        torch.compile, tg._to_device, torch.Tensor.item = real_compile, real_to_device, real_item
        torch.tensor, torch.Tensor.new_tensor = real_tensor, real_new_tensor
        dist.destroy_process_group()


def visited_steps(args) -> list[int]:
    """The timed run's steps that the preflight runs: the first three of every stage (a new
    batch size, window and YaRN state each), the split step and the two after it, and the
    last two steps; in order. Every other step repeats one of these states."""
    N = tg.total_steps(args)
    firsts = bench.stage_starts(args)[:3] + ([args.num_scheduled_iterations] if args.num_extension_iterations else [])
    split = tg.split_step(args)
    steps = {0, 1, 2} | {s + d for s in firsts for d in range(3)} | {split, split + 1, split + 2, N - 2, N - 1}
    return sorted(s for s in steps if 0 <= s < N)


def loss_head_buffers(T: int, V: int, K: int) -> list[list[str]]:
    """The (T, V)-sized buffers inductor allocates for the training loss head: the loss of
    train_gpt.training_loss on bf16 logits (what the FP8 head returns) with K predictions,
    compiled with inductor for the CPU at a small (T, V). Returns the dtypes of the buffers
    of the forward code and of the backward code."""
    from torch._inductor.utils import run_and_get_code

    logits = torch.randn(T, V, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (T,))
    weights = torch.tensor([1.0, 0.5, 0.25][:K])

    head = getattr(tg, "training_loss", None) or (lambda x, t, w: tg.mtp_loss(tg.softcap(x.float()), t, w))
    compiled = torch.compile(head, backend="inductor", dynamic=False, fullgraph=True)

    def step():
        compiled(logits, targets, weights).backward()

    torch._dynamo.reset()
    _, codes = run_and_get_code(step)
    found = []
    for code in codes:  # the forward's code, then the backward's
        found.append([])
        for m in re.finditer(r"empty_strided_cpu\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)", code):
            dims = [int(d) for d in m[1].replace(" ", "").split(",") if d]
            if len(dims) == 2 and dims[0] * dims[1] == T * V:
                found[-1].append(m[2])
    torch._dynamo.reset()
    return found


def fp8_head_bodies(recorder: GraphRecorder, args) -> tuple[int, int]:
    """Runs the FP8 lm_head ops' own bodies (forward and backward, which the model's graph
    sees as opaque ops) on meta tensors of one micro-batch: (host-device syncs, kernels
    unfused). The bodies are compiled on CUDA, so their kernels fuse there."""
    T = max(args.train_batch_sizes) // tg.VIRTUAL_RANKS
    V, d = tg.next_multiple_of_n(args.vocab_size, 128), args.model_dim
    x = torch.empty(T, d, dtype=torch.bfloat16, device="meta")
    w = torch.empty(V, d, dtype=torch.bfloat16, device="meta")
    g = torch.empty(T, V, dtype=torch.bfloat16, device="meta")
    scales = (tg.FP8_X_SCALE, tg.FP8_W_SCALE, tg.FP8_GRAD_SCALE)
    before = recorder.host_values
    with DeviceOps(recorder) as ops:
        _, x_f8, w_f8 = tg.fp8_mm._init_fn(x, w, *scales)
        tg.fp8_mm_backward._init_fn(g, x_f8, w_f8, *scales)
    return len(ops.syncs) + recorder.host_values - before, ops.kernels


def fused_kernels_per_micro_batch(args) -> tuple[int, int]:
    """Inductor's CPU code for one tiny-size micro-batch (forward and backward): generated
    (fused) kernels and extern calls (matmuls, custom ops). Minutes on 2 cores."""
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    tiny = tg.parse_args(["--preset=tiny"])
    torch.manual_seed(0)
    plan = tg.dataclasses.replace(tg.base_plan(tiny, "cpu"), act_dtype=torch.bfloat16)
    model = tg.build_model(tiny, plan)
    T = tiny.train_batch_sizes[0] // tg.VIRTUAL_RANKS
    inputs = torch.randint(0, 50000, (T,), dtype=torch.int32)
    targets = torch.randint(0, 50000, (T,))
    cu = torch.tensor([0, T // 3] + [T] * 126, dtype=torch.int32)
    weights = torch.tensor(tg.mtp_weights(0, tiny))

    def micro_batch():
        loss = torch.compile(model, backend="inductor", dynamic=False, fullgraph=True)(
            inputs, targets, cu, tiny.train_max_seq_len, weights)
        loss.backward()

    torch._dynamo.reset()
    metrics.reset()
    _, codes = run_and_get_code(micro_batch)
    extern = sum(len(re.findall(r"extern_kernels\.\w+\(|torch\.ops\.\w+\.\w+\.default\(", c)) for c in codes)
    return metrics.generated_kernel_count, extern


def fused_kernels_per_optimizer_graph() -> dict:
    """Inductor's CPU kernels for one call of each compiled optimizer piece (small shapes)."""
    from torch._inductor import metrics

    counts = {}
    n, units, r, c = 2, 4, 16, 16
    p = torch.zeros(n, units * r, c, dtype=torch.bfloat16)
    normuon = (torch.zeros(n, units, r, c, dtype=torch.bfloat16), torch.zeros(n, units, r, 1), p,
               torch.zeros(n, units * r, c, dtype=torch.uint16), torch.ones(n, 1, 1, dtype=torch.float64),
               torch.ones(n, 1, 1, dtype=torch.float64), torch.tensor(0.02, dtype=torch.float64),
               torch.tensor(0.02), 0.95)
    q = torch.zeros(64, 16, dtype=torch.bfloat16)
    adam = (q, q.clone(), torch.zeros(64, 16), torch.zeros(64, 16), 0.9, 0.99, 1e-10, torch.tensor(0.01),
            torch.tensor(0.001))
    for name, fn, inputs in (("normuon_apply_", tg.normuon_apply_, normuon), ("adam_update", tg.adam_update, adam)):
        torch._dynamo.reset()
        metrics.reset()
        torch.compile(fn, backend="inductor", dynamic=False, fullgraph=True)(*inputs)
        counts[name] = metrics.generated_kernel_count
    torch._dynamo.reset()
    return counts


def attention_pairs_of(cu: torch.Tensor, T: int):
    """attention_pairs for graph_kernels: pairs a call with `positions` rows scores in this
    micro-batch (2T rows: paired heads, documents doubled)."""
    cache = {}

    def pairs(window, positions):
        key = (window, positions)
        if key not in cache:
            cache[key] = bench.attended_keys(cu * (positions // T), positions, window)
        return cache[key]
    return pairs


def saved_tv(forward_gm, T: int, V: int) -> list[str]:
    """The forward graph's outputs of T x V elements (each tensor once, not its aliases):
    what the backward keeps of them."""
    out = next(n for n in forward_gm.graph.nodes if n.op == "output")
    roots = dict.fromkeys(_alias_root(a) for a in torch.utils._pytree.tree_leaves(out.args)
                          if isinstance(a, torch.fx.Node))
    vals = [r.meta.get("val") for r in roots]
    return [f"{str(v.dtype).removeprefix('torch.')} ({'T, V' if v.shape[0] == T else 'V, T'})"
            for v in vals if isinstance(v, torch.Tensor) and v.numel() == T * V]


def roofline_lines(per_step) -> list[str]:
    """The two machine-readable lines: the loss head's (T, V) traffic (a stage-3 step) and
    the modelled step time of each stage (mean over its traced steps, even and odd)."""
    s3 = [s for s in per_step if s["stage"] == 2]
    fwd, bwd = s3[-1]["tv_traffic"]
    by_stage = {}
    for s in per_step:
        by_stage.setdefault(s["stage"], []).append(s["roofline_ms"])
    names = ["stage 1", "stage 2", "stage 3", "extension"]
    kinds = {kind: sum(s["by_kind"][kind] for s in s3) / len(s3) for kind in KINDS}
    return [f"loss head (T, V) traffic per training micro-batch: {fwd + bwd:.1f} bytes/element "
            f"(forward {fwd:.1f}, backward {bwd:.1f})",
            "roofline step ms (H100 SXM model): " + ", ".join(
                f"{names[k]}: {sum(v) / len(v):.1f}" for k, v in sorted(by_stage.items())),
            "roofline stage 3 by kind, ms: " + ", ".join(f"{kind}: {ms:.1f}" for kind, ms in kinds.items())]


def gpu_trainer(args, world_size: int):
    """The Trainer of rank 0 of world_size on the `meta` device, with the choices a GPU run
    makes where every fast path is proven and faster (train_gpt.assumed_gpu_plan): bf16
    activations and Polar Express, the FP8 head, the fused loss head in one pass and the fused
    MLP (unless their flags are off), compiled; attention_stand_in as the attention kernel.
    Scripts older than the start-up plan get the same choices set on their model instead."""
    if hasattr(tg, "assumed_gpu_plan"):
        plan = tg.assumed_gpu_plan(args, world_size, attention_stand_in)
        return tg.Trainer(args, 0, world_size, plan, lambda *a, **k: None)
    trainer = tg.Trainer(args, 0, world_size, torch.device("meta"), lambda *a, **k: None)  # an older script
    legacy = dict(attn_fn=attention_stand_in, use_fp8=True)
    if hasattr(trainer.model, "fused_loss"):
        legacy["fused_loss"] = getattr(tg, "FUSED_LOSS_PATHS", (True,))[0] if args.fused_loss != "off" else None
    for name, value in legacy.items():
        setattr(trainer.model, name, value)
    if hasattr(trainer.model, "set_fused_mlp"):
        trainer.model.set_fused_mlp(args.fused_mlp != "off")
    trainer.opt.muon.ortho_dtype = torch.bfloat16
    return trainer


def train_step_counting_optimizer(trainer, step: int, counted) -> None:
    """trainer.train_step(step) with counted() entered around its optimizer step (the
    trainer's seam; an older script's optimizer step is wrapped instead)."""
    import inspect
    if "around_optimizer" in inspect.signature(trainer.train_step).parameters:
        trainer.train_step(step, around_optimizer=counted)
        return
    real_step = trainer.opt.step

    def step_counted(*a, **k):
        with counted():
            real_step(*a, **k)
    trainer.opt.step = step_counted
    try:
        trainer.train_step(step)
    finally:
        trainer.opt.step = real_step


def phase(what: str) -> None:
    """One line as each phase starts (tracing takes minutes on a CPU)."""
    print(f"preflight: {what} ...", flush=True)


def step_counts(recorder: GraphRecorder, trainer, args, step: int, ops, opt_ops, cpu_batches: list,
                roofline: bool, world_size: int) -> dict:
    """Counts: what one traced training step ran (its syncs, the ops of its graphs per
    micro-batch, the optimizer's eager kernels and graphs, its FLOPs and, with roofline,
    the modelled kernels' time and the (T, V) and (T, 4d) traffic)."""
    V_pad = tg.next_multiple_of_n(args.vocab_size, 128)
    model_calls = [c for c in recorder.calls if c[0] == "GPT"]
    micro = sum(graph_ops(recorder.graphs[i][3]) for _, _, i in model_calls) / trainer.grad_accum
    opt_graph_ops = sum(graph_ops(recorder.graphs[i][3]) for _, _, i in opt_ops[1])
    opt_graph_names = Counter(name for name, _, _ in opt_ops[1])
    batches = [b for b in cpu_batches if len(b) == 3]
    flops = world_size * sum(bench.step_flops(trainer.model, args, [(inp.numel(), cu)], step)
                             for inp, _, cu in batches)
    entry = dict(step=step, stage=tg.stage(step, args), syncs=ops.syncs, micro=micro,
                 opt_eager=opt_ops[0], opt_graphs=len(opt_ops[1]), opt_graph_ops=opt_graph_ops,
                 opt_graph_names=opt_graph_names, flops=flops)
    if roofline:
        T = batches[0][0].numel()
        pairs = attention_pairs_of(batches[0][2], T)
        fwd = [k for _, kind, i in model_calls if kind == "forward"
               for k in graph_kernels(recorder.graphs[i][3], pairs)]
        aliases = saved_aliases(recorder.graphs[next(i for _, kind, i in model_calls
                                                     if kind == "forward")][3])
        bwd = [k for _, kind, i in model_calls if kind == "backward"
               for k in graph_kernels(recorder.graphs[i][3], pairs, aliases)]
        opt = opt_ops[2] + [k for _, _, i in opt_ops[1] for k in graph_kernels(recorder.graphs[i][3])]
        for k in opt:
            k.optimizer = True
        priced = [k.priced() for k in fwd + bwd + opt]  # (seconds, kind) of each kernel, once
        entry["roofline_ms"] = 1000 * sum(s for s, _ in priced)
        entry["by_kind"] = {kind: 1000 * sum(s for s, k in priced if k == kind) for kind in KINDS}
        figures = {k.family: triton_figures(k.family) for k in fwd + bwd + opt if k.family}
        entry["triton"] = sorted((family, why if isinstance(why, str) else "") for family, why in figures.items())
        entry["tv_traffic"] = (tv_traffic(fwd, T, V_pad), tv_traffic(bwd, T, V_pad))
        entry["saved"] = saved_tv(recorder.graphs[model_calls[0][2]][3], T, V_pad)
        H4 = 4 * args.model_dim  # the MLP's hidden width: (T, 4d) tensors, per layer
        entry["mlp_traffic"] = (tv_traffic(fwd, T, H4) / args.num_layers,
                                tv_traffic(bwd, T, H4) / args.num_layers)
        entry["mlp_saved"] = len(saved_tv(recorder.graphs[model_calls[0][2]][3], T, H4)) / args.num_layers
    return entry


class Trace(NamedTuple):
    """What tracing the record's steps recorded: the steps traced, per-step counts, the
    graphs compiled per phase and the FP8 head bodies' syncs and ops."""
    args: object
    steps: list
    per_step: list
    compiles: dict
    fp8_syncs: int
    fp8_kernels: int


def trace(args, roofline: bool) -> Trace:
    """Trace: the trainer of rank 0 of 8 on `meta` (gpu_trainer) runs the exact warm-up, then
    the timed run's visited steps and the final validation, through the recording backend;
    each step's counts come from step_counts. Raises what tracing raises (a graph break
    under fullgraph, ...)."""
    world_size = tg.VIRTUAL_RANKS
    recorder = GraphRecorder()
    with tempfile.TemporaryDirectory() as tmp:
        steps = visited_steps(args)
        need = sum(tg.batch_size_at(s, args) // world_size + 1 for s in steps) * world_size
        val = args.val_batch_size + 1
        bench.write_synthetic_shards(Path(tmp), 2 * need + 1_000_000, 2 * val)
        args = tg.dataclasses.replace(args, train_files=f"{tmp}/synth_train_*.bin", val_files=f"{tmp}/synth_val_*.bin",
                                      compile="on", warmup=True)
        with preflight_environment(recorder, world_size) as cpu_batches:
            torch._dynamo.reset()
            torch._dynamo.config.cache_size_limit = 64
            phase(f"building the model and optimizers on meta as rank 0 of {world_size}, with a GPU rank's plan")
            trainer = gpu_trainer(args, world_size)
            phase(f"tracing the warm-up: {len(tg.warmup_steps(args))} steps and their validations")
            trainer.warmup()
            phase(f"tracing {len(steps)} steps of the timed run and the final validation")
            recorder.phase = "timed run"
            trainer.restart_data()
            trainer.model.set_windows(*tg.windows_at(0, args))
            per_step = []
            for step in steps:
                if step == 0 or step == steps[len(steps) // 2]:
                    trainer.validate(max_steps=1)
                recorder.calls.clear()
                cpu_batches.clear()
                items, host_values = recorder.items, recorder.host_values
                opt_ops = None
                with DeviceOps(recorder) as ops:
                    @contextlib.contextmanager
                    def counted_optimizer():
                        nonlocal opt_ops
                        calls_before = len(recorder.calls)
                        with DeviceOps(recorder) as inner:
                            yield
                        opt_ops = (inner.kernels, [recorder.calls[i] for i in range(calls_before, len(recorder.calls))],
                                   inner.records)
                    train_step_counting_optimizer(trainer, step, counted_optimizer)
                ops.syncs += ["Tensor.item()"] * (recorder.items - items)
                ops.syncs += ["a tensor built from Python values on the device"] * (recorder.host_values - host_values)
                per_step.append(step_counts(recorder, trainer, args, step, ops, opt_ops, cpu_batches, roofline,
                                            world_size))
            trainer.model.set_windows(*tg.final_windows(args), yarn=False)
            trainer.validate(max_steps=1)
            fp8_syncs, fp8_kernels = fp8_head_bodies(recorder, args)
    return Trace(args, steps, per_step, dict(recorder.compiles), fp8_syncs, fp8_kernels)


def run(args, step_ms, kernels: bool, roofline: bool = False) -> int:
    """Trace, then report; exit status 1 on a problem."""
    try:
        t = trace(args, roofline)
    except Exception as e:  # torch._dynamo.exc.Unsupported and friends: a graph break under fullgraph
        print(f"preflight: FAILED while tracing: {type(e).__name__}: {str(e).splitlines()[0]}")
        return 1
    return report(t, step_ms, kernels, roofline)


def report(t: Trace, step_ms, kernels: bool, roofline: bool) -> int:
    """Report: the trace's figures, one line each, and the problems they show (exit 1)."""
    args, steps, per_step, world_size = t.args, t.steps, t.per_step, tg.VIRTUAL_RANKS
    fp8_syncs, fp8_kernels = t.fp8_syncs, t.fp8_kernels
    problems = []
    warm = sum(v for (n, p), v in t.compiles.items() if p == "warm-up")
    timed = sum(v for (n, p), v in t.compiles.items() if p == "timed run")
    print(f"configuration: preset {args.preset}, rank 0 of {world_size}, {tg.total_steps(args)} steps; "
          f"{len(steps)} timed-run steps traced: {steps}")
    per_fn = ", ".join(f"{n}: {v}" for (n, p), v in sorted(t.compiles.items()) if p == "warm-up")
    print(f"graphs compiled in the warm-up: {warm} ({per_fn})")
    print("graph breaks: 0 (fullgraph=True traced every graph)")
    print(f"recompiles in the timed run: {timed}")
    if timed:
        problems.append(f"{timed} recompile(s) in the timed run")
    syncs = [(s["step"], x) for s in per_step for x in s["syncs"]]
    print(f"host-device syncs per training step: {max(len(s['syncs']) for s in per_step)}"
          + (f" (e.g. step {syncs[0][0]}: {syncs[0][1]})" if syncs else ""))
    if syncs:
        problems.append(f"{len(syncs)} host-device sync(s) in training steps")
    print(f"FP8 lm_head op bodies (forward + backward): {fp8_syncs} host-device syncs, {fp8_kernels} ops "
          f"(compiled on CUDA: casts and transposes fuse)")
    if fp8_syncs:
        problems.append(f"{fp8_syncs} host-device sync(s) in the FP8 head's ops")
    even = [s for s in per_step if s["step"] % 2 == 0]
    odd = [s for s in per_step if s["step"] % 2 == 1]
    micro = {}
    for s in per_step:
        micro.setdefault(s["stage"], int(s["micro"]))
    print("ops per training micro-batch (forward + backward graphs, unfused): "
          + ", ".join(f"stage {k + 1}: {v}" for k, v in sorted(micro.items())))
    for name, group in (("even", even), ("odd", odd)):
        s = max(group, key=lambda s: s["opt_eager"] + s["opt_graphs"])
        print(f"optimizer step ({name}, rank 0 of {world_size}): {s['opt_eager']} eager kernels + "
              f"{s['opt_graphs']} compiled graphs ({s['opt_graph_ops']} ops fused into them)")
    T = max(args.train_batch_sizes) // world_size
    V = tg.next_multiple_of_n(args.vocab_size, 128)
    small_T, small_V = 96, 640  # inductor's CPU code at a small size; its buffers scale with (T, V)
    phase("compiling the loss head with inductor at a small size, for its (T, V) buffers")
    for K in (3, 2, 1):
        fwd, bwd = loss_head_buffers(small_T, small_V, K)
        print(f"(T, V) buffers of the loss head with {K} prediction(s): backward {len(bwd)} "
              f"({', '.join(bwd) or 'none'}), forward {len(fwd)} ({', '.join(fwd) or 'none'}); "
              f"each {T:,} x {V:,} at this size")
        if len(bwd) > 1 or "float32" in bwd:
            problems.append(f"the loss backward with {K} predictions writes {len(bwd)} (T, V) buffers ({bwd})")
    print(f"{'stage':>6} {'FLOPs/step':>12} {'step ms':>8} {'MFU':>6}   (8 GPUs x 989 TFLOP/s bf16"
          + ("; no step times at this size: give --step_ms" if step_ms is None else "") + ")")
    for k in range(3):
        s = next((s for s in per_step if s["stage"] == k), None)
        if s is None:
            continue
        if step_ms is None:  # the record's step times mean nothing at another size
            print(f"{k + 1:>6} {s['flops']:>12.3e} {'n/a':>8} {'n/a':>6}")
            continue
        ms = step_ms[k]
        mfu = s["flops"] / (ms / 1000) / (world_size * bench.H100_BF16_FLOPS)
        print(f"{k + 1:>6} {s['flops']:>12.3e} {ms:>8.1f} {100 * mfu:>5.1f}%")
    if roofline:
        eff = ROOFLINE_EFFICIENCY
        print(f"roofline model: H100 SXM {H100_SXM['bf16'] / 1e12:.0f} TFLOP/s bf16, {H100_SXM['fp8'] / 1e12:.0f} FP8, "
              f"{H100_SXM['bandwidth'] / 1e12:.2f} TB/s; assumed efficiency: matmuls {eff['matmul']:.0%}, attention "
              f"{eff['attention']:.0%}, bandwidth {eff['bandwidth']:.0%}, at least {eff['min_kernel_us']:.0f} us per "
              f"kernel; {H100_SXM['sfu'] / 1e12:.1f}e12 special-function ops/s; Triton kernels derated below "
              f"{kernel_report.BYTES_IN_FLIGHT_NEEDED / 1024:.0f} KB of loads in flight per SM; communication not "
              f"modelled (a model, not a measurement)")
        s3 = next(s for s in reversed(per_step) if s["stage"] == 2)
        print(f"(T, V) tensors saved for the backward: {', '.join(s3['saved']) or 'none'}")
        fwd, bwd = s3["mlp_traffic"]
        print(f"MLP (T, 4d) traffic per layer per training micro-batch: {fwd + bwd:.1f} bytes/element "
              f"(forward {fwd:.1f}, backward {bwd:.1f}); (T, 4d) tensors saved for the backward per layer: "
              f"{s3['mlp_saved']:g}")
        for family, why in s3["triton"]:
            print(f"Triton kernel {family}: " + (f"priced without its sm90 figures ({why})" if why else
                                                 "priced from its sm90 compile (tools/kernel_report.py), best config"))
        _last_roofline_lines[:] = roofline_lines(per_step)
        for line in _last_roofline_lines:
            print(line)
    if kernels:
        phase("compiling one tiny micro-batch with inductor, for its kernel count (minutes)")
        fused, extern = fused_kernels_per_micro_batch(args)
        print(f"kernels per training micro-batch (inductor, CPU code, tiny size): {fused} fused + {extern} extern")
        if hasattr(tg, "normuon_apply_"):
            per_graph = fused_kernels_per_optimizer_graph()
            for name, group in (("even", even), ("odd", odd)):
                s = max(group, key=lambda s: s["opt_eager"] + s["opt_graphs"])
                fused_opt = sum(per_graph.get(n, 0) * k for n, k in s["opt_graph_names"].items())
                print(f"kernels per optimizer step ({name}, rank 0 of {world_size}): {s['opt_eager'] + fused_opt} "
                      f"({s['opt_eager']} eager + {fused_opt} in compiled graphs: "
                      f"{', '.join(f'{n} {per_graph.get(n, 0)} each' for n in sorted(s['opt_graph_names']))})")
    if problems:
        print("preflight: FAILED: " + "; ".join(problems))
        return 1
    print("preflight: OK")
    return 0


_last_roofline_lines = []  # this script's three roofline lines, for compare_roofline


def compare_roofline(script: str, rest: list[str]) -> int:
    """--roofline --script=OTHER: the same preflight of OTHER in a child process, its three
    roofline lines, and the ratios of this script's figures to OTHER's (the stage-3 step by
    kind as differences)."""
    import subprocess

    mine = _last_roofline_lines
    child = subprocess.run([sys.executable, __file__, "--roofline", f"--script={script}", *rest],
                           env={**os.environ, COMPARED_ENV: "1"}, capture_output=True, text=True)
    theirs = [l for l in child.stdout.splitlines()
              if l.startswith(("loss head (T, V) traffic", "roofline step ms", "roofline stage 3 by kind"))]
    print(f"--script={script}:")
    if child.returncode != 0 or len(theirs) != 3:
        print(child.stdout[-2000:] + child.stderr[-2000:])
        print("preflight: FAILED: the --script run did not finish")
        return 1
    for line in theirs:
        print(line)
    num = lambda line: [float(x) for x in re.findall(r": (\d+\.\d+)", line)]  # noqa: E731
    traffic = num(mine[0])[0] / num(theirs[0])[0]
    stages = [a / b for a, b in zip(num(mine[1]), num(theirs[1]))]
    names = ["stage 1", "stage 2", "stage 3", "extension"]
    print(f"ratio (this script / --script): loss head traffic {traffic:.2f}, roofline step "
          + ", ".join(f"{n} {r:.3f}" for n, r in zip(names, stages)))
    print("stage 3 by kind, this script - --script (ms): " + ", ".join(
        f"{kind} {a - b:+.1f}" for kind, a, b in zip(KINDS, num(mine[2]), num(theirs[2]))))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--step_ms", default=None,
                    help="ms per step of the three stages, for the MFU (default: the record's, for the record "
                         "configuration; none at another --preset)")
    ap.add_argument("--kernels", action="store_true", help="also count inductor's fused kernels (slow)")
    ap.add_argument("--roofline", action="store_true",
                    help="also the loss head's (T, V) traffic and a modelled step time per stage (H100 SXM); "
                         "with --script, for both scripts and their ratios")
    ap.add_argument("--script", default=None, help="check this train_gpt.py instead of the repository's")
    ap.add_argument("--sm90", action="store_true",
                    help="only the sm90 kernel report of the Triton kernels (tools/kernel_report.py)")
    known, rest = ap.parse_known_args(argv)
    if known.sm90:
        return kernel_report.main()
    try:
        args = tg.parse_args(rest)
        step_ms = RECORD_STEP_MS if args.preset == "record" else None
        if known.step_ms is not None:
            step_ms = tuple(float(v) for v in known.step_ms.split(","))
            if len(step_ms) != 3 or min(step_ms) <= 0:
                raise tg.ConfigError(f"--step_ms={known.step_ms}: expected 3 positive numbers")
    except (tg.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not known.roofline or known.script is None or os.environ.get(COMPARED_ENV):
        return run(args, step_ms, known.kernels, known.roofline)
    code = run(args, step_ms, known.kernels, True)
    return max(code, compare_roofline(known.script, rest))


if __name__ == "__main__":
    sys.exit(main())
