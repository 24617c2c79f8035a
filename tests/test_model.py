"""Tests of the model section of train_gpt.py (ALGORITHM.md section 2, with the windows of 4.2).

Every check compares the code against an independent reference (tests/reference.py): Python
loops, explicit masks and float64 formulas taken from ALGORITHM.md, never the code's own
output. CPU only except the tests marked for CUDA; the tiny preset keeps it light.
"""
import dataclasses
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from reference import (  # the float64 references, and the layout they are written from
    F64, V_PAD, GATE, ATTN_LAYERS, PAIRED, LONG, VE_MAP, VE_ORDER, f64, scalars, ref_rmsnorm, ref_freqs,
    ref_cos_sin, ref_rotate, ref_rotate_paired, ref_doc_ids, ref_mask, loop_attention, to_pairs, from_pairs,
    shift_keys, ref_qkv, ref_attention_layer, ref_forward, ref_softcap, ref_mtp, yarn_ref, yarn_ref_f32,
    assert_close,
)

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------
# helpers: building, randomizing, capturing
# ------------------------------------------------------------------------------------

def tiny_args(**overrides):
    kw = dict(tg.PRESETS["tiny"])
    kw.update(overrides)
    return tg.Hyperparameters(**kw)


def tiny_plan(**choices):
    """The CPU reference plan (SDPA, float32 activations, no fused path) with `choices` changed."""
    return dataclasses.replace(tg.RunPlan(torch.device("cpu")), **choices)


def tiny_model(seed=0, plan=None, **overrides):
    """A tiny-preset model on the CPU; plan: RunPlan fields to change (e.g. attn_fn)."""
    torch.manual_seed(seed)
    return tg.build_model(tiny_args(**overrides), tiny_plan(**(plan or {})))


@torch.no_grad()
def randomize(model, seed=1, attn_out=True):
    """Every parameter nonzero and distinct (O projections and c_proj included), so that
    each term of the forward pass shows in the output."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, std):
        return torch.randn(shape, generator=g) * std

    d = model.args.model_dim
    model.lm_head.copy_(rnd(model.lm_head.shape, 0.5))
    model.embed.copy_(rnd(model.embed.shape, 0.5))
    for t in model.value_embeds:
        t.copy_(rnd(t.shape, 0.5))
    for b in model.blocks:
        if b.attn is not None:
            b.attn.qkvo.copy_(rnd(b.attn.qkvo.shape, d ** -0.5))
            if not attn_out:
                b.attn.qkvo[3 * d:].zero_()
        b.mlp.c_fc.copy_(rnd(b.mlp.c_fc.shape, 0.5 * d ** -0.5))
        b.mlp.c_proj.copy_(rnd(b.mlp.c_proj.shape, 0.5 * (4 * d) ** -0.5))
    for p in (model.attn_gate_bank, model.ve_gate_bank, model.smear_gate, model.skip_gate):
        p.copy_(rnd(p.shape, 0.5))
    sc = model.scalar_views()
    sc.resid_lambda.copy_(0.8 + 0.4 * torch.rand(11, generator=g))
    sc.sa_lambda.copy_((0.4 + 0.8 * torch.rand(22, generator=g)).view(11, 2))
    sc.smear_lambda.fill_(0.7)
    sc.backout_lambda.fill_(0.4)
    sc.skip_lambda.fill_(0.3)
    model.x0_lambda.copy_(torch.rand(11, generator=g) - 0.5)


def random_tokens(T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (T,), generator=g), torch.randint(0, 50257, (T,), generator=g)


def cu_tensor(cu):
    return torch.tensor(cu, dtype=torch.int32)


def max_len(cu):
    return max(b - a for a, b in zip(cu[:-1], cu[1:]))


def with_attention(model, fn):
    """The same model (weights, windows, YaRN state), built with `fn` as its plan's attention
    backend (a plan is fixed for a model's life)."""
    twin = tg.build_model(model.args, dataclasses.replace(model.plan, attn_fn=fn))
    tg.restore_model_state(twin, tg.model_state(model))
    return twin


class AttnRecorder:
    """Stands in for model.attn_fn: calls a real backend and keeps what it was given."""

    def __init__(self, fn=tg.attention_sdpa, edit=None):
        self.fn, self.edit, self.calls = fn, edit, []

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, window, scale):
        if self.edit is not None:
            q, k, v = self.edit(len(self.calls), q, k, v)
        out = self.fn(q, k, v, cu_seqlens, max_seqlen, window, scale)
        self.calls.append(dict(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone(),
                               cu=cu_seqlens.clone(), max_seqlen=max_seqlen, window=window, scale=scale,
                               out=out.detach().clone()))
        return out


@contextmanager
def module_io(model):
    """Captures the input (first argument) and output of every block's attn and mlp."""
    inputs, outputs, handles = {}, {}, []
    for i, b in enumerate(model.blocks):
        for kind in ("attn", "mlp"):
            mod = getattr(b, kind)
            if mod is None:
                continue

            def pre(m, args, key=(i, kind)):
                inputs[key] = args[0].detach().clone()

            def post(m, args, out, key=(i, kind)):
                outputs[key] = out.detach().clone()

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def eval_loss(model, inp, tgt, cu):
    model.eval()
    with torch.no_grad():
        return model(inp, tgt, cu_tensor(cu), max_len(cu))


# ------------------------------------------------------------------------------------
# 1. parameter counts, build time and dtypes of the record configuration
# ------------------------------------------------------------------------------------

def test_record_parameter_counts_on_meta():
    model = tg.build_model(tg.Hyperparameters(), "meta")
    named = dict(model.named_parameters())
    assert all(p.is_meta for p in named.values())
    d, V = 768, V_PAD
    qkvo = sum(b.attn.qkvo.numel() for b in model.blocks if b.attn is not None)
    mlp = sum(b.mlp.c_fc.numel() + b.mlp.c_proj.numel() for b in model.blocks)
    head = model.lm_head.numel()
    assert (qkvo, mlp, head) == (23_592_960, 51_904_512, 38_633_472)
    assert (qkvo, mlp, head) == (10 * 4 * d * d, 11 * 2 * 4 * d * d, V * d)  # the same, by formula
    assert qkvo + mlp + head == 114_130_944
    total = sum(p.numel() for p in named.values())
    assert total == 268_665_983
    # the total by hand: lm_head, embed and 3 value embeddings; matrices; gates; scalars
    assert total == 5 * V * d + qkvo + mlp + 10 * 6 * 12 + 5 * 6 * 12 + 12 + 12 + 36 + 11
    assert model.blocks[6].attn is None and all(model.blocks[i].attn is not None for i in ATTN_LAYERS)


def test_meta_build_does_no_work_of_the_parameters_size():
    """Building the record model on `meta` (what the preflight does) is shapes only: no op
    makes a real tensor as large as one (d, d) weight, and every parameter is on meta (an op
    count, not a clock: it holds on a busy machine)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    d = tg.Hyperparameters().model_dim
    big = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() >= d * d:
                    big.append((str(func), tuple(t.shape)))
            return out

    with Watch():
        model = tg.build_model(tg.Hyperparameters(), "meta")
    assert big == [], big[:5]
    assert all(p.is_meta for p in model.parameters())


def test_record_dtypes_and_shapes():
    model = tg.build_model(tg.Hyperparameters(), "meta")
    for name, p in model.named_parameters():
        want = torch.float32 if name in ("scalars", "x0_lambda") else torch.bfloat16
        assert p.dtype == want, name
    assert model.attn_gate_bank.shape == (10, 6, 12)
    assert model.ve_gate_bank.shape == (5, 6, 12)
    assert model.smear_gate.shape == (1, 12) and model.skip_gate.shape == (1, 12)
    assert model.x0_lambda.shape == (11,)
    assert model.lm_head.shape == model.embed.shape == (V_PAD, 768)
    assert all(t.shape == (V_PAD, 768) for t in model.value_embeds)
    for b in model.blocks:
        assert b.mlp.c_fc.shape == b.mlp.c_proj.shape == (4 * 768, 768)
        if b.attn is not None:
            assert b.attn.qkvo.shape == (4 * 768, 768)
    assert model.rotary.factor1.dtype == model.rotary.factor2.dtype == torch.bfloat16


def test_initialization_follows_spec():
    model = tiny_model(seed=0)
    d = model.args.model_dim
    assert abs(model.lm_head.float().std().item() - 0.005) < 0.0002
    for p in (model.embed, *model.value_embeds, model.attn_gate_bank, model.ve_gate_bank,
              model.smear_gate, model.skip_gate, model.x0_lambda):
        assert not p.detach().float().any()
    bound_attn, bound_fc = math.sqrt(3) * d ** -0.5, math.sqrt(3) * 0.5 * d ** -0.5
    for b in model.blocks:
        w = b.mlp.c_fc.detach().float()
        assert w.abs().max() <= bound_fc * 1.001 and w.abs().max() > 0.95 * bound_fc
        assert not b.mlp.c_proj.detach().float().any()
        if b.attn is not None:
            qkv = b.attn.qkvo[:3 * d].detach().float()
            assert qkv.abs().max() <= bound_attn * 1.001 and qkv.abs().max() > 0.95 * bound_attn
            assert abs(qkv.std().item() - bound_attn / math.sqrt(3)) < 0.03 * bound_attn
            assert not b.attn.qkvo[3 * d:].detach().float().any()
    sc = scalars(model)
    assert torch.equal(sc["resid"], torch.full((11,), 1.1, dtype=torch.float32).double())
    assert torch.equal(sc["sa"], torch.tensor([[0.5, 1.0]] * 11, dtype=F64))
    assert (sc["smear"], sc["backout"], sc["skip"]) == (0.0, 0.5, -1.5)
    assert model.windows == (1, 3) and model.rotary.attn_scale == 0.1


# ------------------------------------------------------------------------------------
# 2. loss at initialization
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(num_heads=4, head_dim=8, model_dim=32)],
                         ids=["tiny", "reduced_width"])
def test_initial_loss_is_log_vocab(overrides):
    model = tiny_model(seed=1, **overrides)
    T = 128
    inp, tgt = random_tokens(T, seed=2)
    cu = [0, 37, 90, T, T]
    target = math.log(V_PAD)
    ev = eval_loss(model, inp, tgt, cu).item()
    assert abs(ev - target) < 0.02
    model.train()
    with torch.no_grad():
        tr = model(inp, tgt, cu_tensor(cu), max_len(cu), torch.tensor([1.0])).item() / T
    assert abs(tr - target) < 0.02
    assert abs(tr - ev) < 1e-4  # same logits on CPU: sum / T == mean


# ------------------------------------------------------------------------------------
# 3. attention backends vs a loop reference
# ------------------------------------------------------------------------------------

ATTN_CASES = [
    # (T, cu_seqlens padded with T, window)
    (48, [0, 1, 2, 17, 18, 40, 48, 48, 48], 5),  # length-1 documents, padding
    (48, [0, 48], 0),  # window 0: each query sees itself only
    (48, [0, 10, 11, 30, 48], 1000),  # window longer than any document
    (64, [0, 3, 4, 64, 64], 16),
]


def backend_fn(name, device):
    """The backend's function, or pytest.skip when this machine cannot run it."""
    if name == "flex" and device.type == "cpu":
        return tg.attention_flex  # forward only on CPU: called directly
    try:
        fn, _ = tg.forced_attention_backend(name, device)
    except tg.ConfigError as e:
        pytest.skip(str(e))
    return fn


def run_backend(name, q, k, v, cu, max_seqlen, window, scale):
    device = torch.device("cuda" if CUDA else "cpu")
    fn = backend_fn(name, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = [t.to(device, dtype) for t in (q, k, v)]
    try:
        out = fn(*args, cu_tensor(cu).to(device), max_seqlen, window, scale)
    except Exception as e:  # e.g. FlexAttention unsupported in this build
        if name == "sdpa":
            raise
        pytest.skip(f"{name} cannot run here: {type(e).__name__}: {e}")
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    return out.float().cpu(), tol


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", range(len(ATTN_CASES)))
@pytest.mark.parametrize("backend", list(tg.ATTENTION_BACKENDS))
def test_attention_backend_matches_loop_reference(backend, case):
    T, cu, window = ATTN_CASES[case]
    g = torch.Generator().manual_seed(10 + case)
    H, D, scale = 2, 16, 0.3
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    out, tol = run_backend(backend, q, k, v, cu, max_len(cu), window, scale)
    ref, _ = loop_attention(q, k, v, cu, window, scale)
    assert_close(out, torch.from_numpy(ref), atol=tol, msg=f"{backend} case {case}")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", list(tg.ATTENTION_BACKENDS))
def test_attention_window_edge_and_documents(backend):
    """With v = identity the output rows are the attention probabilities: key i-w is
    visible, key i-w-1 is not; nothing crosses a document boundary."""
    T, w = 32, 5
    cu = [0, 12, 13, 32, 32]
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(T, 1, T, generator=g) * 0.3, torch.randn(T, 1, T, generator=g) * 0.3
    v = torch.eye(T)[:, None, :]
    probs, tol = run_backend(backend, q, k, v, cu, max_len(cu), w, 0.5)
    probs = probs[:, 0, :]
    _, ref = loop_attention(q, k, v, cu, w, 0.5)
    assert_close(probs, torch.from_numpy(ref[:, 0, :]), atol=tol, msg=backend)
    doc = ref_doc_ids(cu, T)
    for i in range(T):
        if i - w >= 0 and doc[i - w] == doc[i]:
            assert probs[i, i - w] > 1e-3, (i, "key i-w must be visible")
        if i - w - 1 >= 0:
            assert probs[i, i - w - 1] == 0, (i, "key i-w-1 must be masked")
        for j in range(T):
            if doc[j] != doc[i] or j > i:
                assert probs[i, j] == 0, (i, j)
    assert probs[12, 12] == pytest.approx(1.0, abs=tol)  # a length-1 document sees itself only


def test_document_ids_and_backend_selection():
    for cu in ([0, 1, 2, 17, 18, 40, 48, 48, 48], [0, 48], [0, 5, 5, 48]):
        got = tg.document_ids(cu_tensor(cu), 48).tolist()
        exp = ref_doc_ids(cu, 48)
        # same partition into documents (ids may differ only for empty documents)
        assert all((got[i] == got[j]) == (exp[i] == exp[j]) for i in range(48) for j in range(48))
    plan = tg.resolve_plan(tiny_args(), "cpu", training=False)
    assert plan.attn_backend == "sdpa" and plan.attn_fn is tg.attention_sdpa
    with pytest.raises(tg.ConfigError, match="--attn_backend=flex"):
        tg.resolve_plan(tiny_args(attn_backend="flex"), "cpu", training=False)  # no backward on CPU
    with pytest.raises(ValueError):
        tg.forced_attention_backend("nonsense", "cpu")


class StandInKernels:
    """A `kernels` module without a network: records get_kernel's calls; `fail` makes the
    hub refuse, as kernels 0.14+ refuses a repository outside its maintained set."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail
        self.interface = type("FA3", (), {"flash_attn_varlen_func": staticmethod(lambda *a, **k: None)})()

    def get_kernel(self, repo, **kwargs):
        self.calls.append((repo, kwargs))
        if self.fail:
            raise ValueError(self.fail)
        return type("Kernel", (), {"flash_attn_interface": self.interface})()


@pytest.fixture
def kernels_hub(monkeypatch):
    def install(fail=None, repo=None):
        hub = StandInKernels(fail)
        monkeypatch.setitem(__import__("sys").modules, "kernels", hub)
        if repo is None:
            monkeypatch.delenv("TRAIN_GPT_FA3_REPO", raising=False)
        else:
            monkeypatch.setenv("TRAIN_GPT_FA3_REPO", repo)
        return hub
    return install


def test_fa3_loads_the_hubs_maintained_build_by_default(kernels_hub):
    hub = kernels_hub()
    fa3, what = tg.load_fa3()
    assert hub.calls == [("kernels-community/flash-attn3", {"version": 1})]
    assert fa3 is hub.interface and what == "kernels-community/flash-attn3, version=1"


def test_fa3_from_another_repository_is_trusted_explicitly_and_says_so(kernels_hub):
    hub = kernels_hub(repo="varunneal/flash-attention-3")
    fa3, what = tg.load_fa3()
    assert hub.calls == [("varunneal/flash-attention-3", {"trust_remote_code": True})]
    assert fa3 is hub.interface and what == "varunneal/flash-attention-3, trust_remote_code=True"


def test_fa3_that_cannot_load_falls_back_with_a_one_line_reason(kernels_hub, monkeypatch):
    """On a (pretended) Hopper GPU, a hub that refuses: auto falls back to the next backend
    (proven against SDPA first) and its table row names the FA3 build it tried and why it
    failed, on one line. A hub build that loads but computes wrong values is dropped too."""
    kernels_hub(fail="Repository not in the allow-list\npass trust_remote_code=True")
    hopper = tg.Machine(torch.device("cpu"), cuda=True, capability=(9, 0), triton=True)
    # stand-ins that compute what the GPU kernels compute (varlen_attn has no CPU kernel)
    monkeypatch.setattr(tg, "attention_varlen", lambda *a: tg.attention_sdpa(*a))
    monkeypatch.setattr(tg, "_make_fa3_attention", lambda fa3: lambda *a: tg.attention_sdpa(*a))
    fa3, why = tg.load_fa3()
    assert fa3 is None and "\n" not in why
    assert why == ("cannot load kernels-community/flash-attn3, version=1 from the kernel hub "
                   "(ValueError: Repository not in the allow-list)")

    def attention_row(**flags):
        plan = tg.resolve_plan(tiny_args(compile="off", **flags), "cpu", machine=hopper, training=False)
        return plan.attn_backend, dict((c, (v, w)) for c, v, w in plan.rows)["attention"]

    name, (shown, note) = attention_row()
    assert name == "varlen" and shown == "varlen" and "\n" not in note
    assert note.startswith("auto: proven (") and note.endswith(f"; skipped fa3: {why}")
    with pytest.raises(tg.ConfigError, match="--attn_backend=fa3 cannot run here: cannot load kernels-community"):
        attention_row(attn_backend="fa3")
    kernels_hub()
    name, (shown, note) = attention_row()
    assert name == "fa3" and shown == "fa3 (kernels-community/flash-attn3, version=1)" and note.startswith("auto: proven")
    # a build that runs but returns wrong values: dropped with its error, the next one taken
    monkeypatch.setattr(tg, "_make_fa3_attention", lambda fa3: lambda *a: 1.1 * tg.attention_sdpa(*a))
    name, (shown, note) = attention_row()
    assert name == "varlen" and "fa3: dropped: out error 1.0e-01 > tolerance 2e-02" in note
    with pytest.raises(tg.ConfigError, match="--attn_backend=fa3: its start-up check against SDPA failed: out error"):
        attention_row(attn_backend="fa3")
    monkeypatch.setitem(__import__("sys").modules, "kernels", None)  # not installed
    assert tg.load_fa3() == (None, "the kernels package is not installed (pip install 'kernels>=0.14,<1')")


# ------------------------------------------------------------------------------------
# 4. partial key offset (and q/k as handed to the backend on every layer)
# ------------------------------------------------------------------------------------

def test_partial_key_offset_long_layers_only():
    model = tiny_model(seed=3)
    randomize(model, seed=4)
    a = model.args
    H, D, d = a.num_heads, a.head_dim, a.model_dim
    T = 48
    cu = [0, 20, 21, 48, 48]
    inp, tgt = random_tokens(T, seed=5)
    rec = AttnRecorder()
    model = with_attention(model, rec)
    with module_io(model) as (inputs, _):
        eval_loss(model, inp, tgt, cu)
    assert len(rec.calls) == len(ATTN_LAYERS)
    sa = scalars(model)["sa"]
    freqs = ref_freqs(D)
    for call, layer in zip(rec.calls, ATTN_LAYERS):
        x = f64(inputs[(layer, "attn")])
        q, k, _ = ref_qkv(x, f64(model.blocks[layer].attn.qkvo), sa[layer, 0], H, D)
        if layer in PAIRED:
            exp_q, exp_k = ref_rotate_paired(to_pairs(q), freqs), ref_rotate_paired(to_pairs(k), freqs)
            assert call["cu"].tolist() == [2 * c for c in cu] and call["max_seqlen"] == 2 * max_len(cu)
        else:
            exp_q, exp_k = ref_rotate(q, range(T), freqs), ref_rotate(k, range(T), freqs)
            assert call["cu"].tolist() == cu and call["max_seqlen"] == max_len(cu)
        assert_close(call["q"], exp_q, atol=1e-4, msg=f"q of layer {layer}")
        blocks = model.windows[1] if layer in LONG else model.windows[0]
        assert call["window"] == blocks * a.block_size
        if layer not in LONG:
            assert_close(call["k"], exp_k, atol=1e-4, msg=f"k of layer {layer} (no shift)")
            continue
        shifted = shift_keys(exp_k)
        assert (shifted - exp_k).abs().max() > 0.1  # the shift is visible in this data
        assert_close(call["k"], shifted, atol=1e-4, msg=f"k of long layer {layer}")
        got = f64(call["k"])
        moving = list(range(D // 4, D // 2)) + list(range(3 * D // 4, D))
        still = [c for c in range(D) if c not in moving]
        assert_close(got[0], exp_k[0], atol=1e-4, msg="position 0 keeps its own key")
        assert_close(got[1:, :, moving], exp_k[:-1, :, moving], atol=1e-4, msg="shifted channels")
        assert_close(got[:, :, still], exp_k[:, :, still], atol=1e-4, msg="unshifted channels")
        # across the document boundary at 20 too (the packed sequence is shifted)
        assert_close(got[20, :, moving], exp_k[19, :, moving], atol=1e-4, msg="shift across documents")


# ------------------------------------------------------------------------------------
# 5. paired-head attention
# ------------------------------------------------------------------------------------

def paired_setup(seed, T=24, d=96, H=6, D=16):
    torch.manual_seed(seed)
    attn = tg.Attention(d, H, D, paired=True, key_offset=False)
    with torch.no_grad():
        attn.qkvo.copy_(torch.randn(4 * d, d) * d ** -0.5)  # O nonzero
    rot = tg.YaRNRotary(D, 2 * T, 16)
    x = torch.randn(T, d)
    ve = torch.randn(T, d) * 0.5
    sa = torch.tensor([0.7, 1.3])
    attn_gate = (torch.randn(H, GATE) * 0.5).bfloat16()
    ve_gate = (torch.randn(H, GATE) * 0.5).bfloat16()
    return attn, rot, x, ve, sa, attn_gate, ve_gate


def call_attn(attn, x, ve, sa, attn_gate, ve_gate, rotary, attn_fn, cu_seqlens, max_seqlen, window):
    """One attention layer with its per-call inputs in the order the references take them."""
    return attn(x, tg.AttentionInputs(cu_seqlens, max_seqlen, window, rotary, attn_fn, sa, attn_gate, ve, ve_gate))


@pytest.mark.parametrize("window", [1, 5, 1000])
def test_paired_attention_matches_interleaved_reference(window):
    attn, rot, x, ve, sa, attn_gate, ve_gate = paired_setup(seed=11)
    T, H, D = x.shape[0], attn.num_heads, attn.head_dim
    cu = [0, 7, 8, 15, T, T]
    with torch.no_grad():
        out = call_attn(attn, x, ve, sa, attn_gate, ve_gate, rot, tg.attention_sdpa, cu_tensor(cu), max_len(cu), window)
    ref = ref_attention_layer(f64(x), f64(attn.qkvo), 0.7, 1.3, f64(attn_gate), f64(ve), f64(ve_gate),
                              H, D, cu, window, 0.1, ref_freqs(D), paired=True, key_offset=False)
    assert_close(out, ref, atol=1e-4, msg=f"paired attention, window {window}")
    # ... and differs from plain (unpaired) attention, so the check can tell the two apart
    plain = ref_attention_layer(f64(x), f64(attn.qkvo), 0.7, 1.3, f64(attn_gate), f64(ve), f64(ve_gate),
                                H, D, cu, window, 0.1, ref_freqs(D), paired=False, key_offset=False)
    assert (plain - ref).abs().max() > 1e-2


def test_paired_mask_second_member_visibility():
    T, cu, window = 24, [0, 7, 8, 15, 24, 24], 5
    m = ref_mask(2 * T, [2 * c for c in cu], window)
    for t in range(T):
        assert m[2 * t + 1, 2 * t + 1] and m[2 * t, 2 * t] and m[2 * t + 1, 2 * t]
        assert not m[2 * t, 2 * t + 1]

    # behaviour: O = identity exposes y * gate per head; perturb the value of one member
    # of token t through its value embedding
    attn, rot, x, ve, sa, attn_gate, ve_gate = paired_setup(seed=12, T=T)
    d, H, D = attn.dim, attn.num_heads, attn.head_dim
    with torch.no_grad():
        attn.qkvo[3 * d:].copy_(torch.eye(d))
    sa = torch.tensor([0.7, 1.0])

    def run(ve_):
        with torch.no_grad():
            return call_attn(attn, x, ve_, sa, attn_gate, ve_gate, rot, tg.attention_sdpa, cu_tensor(cu), max_len(cu),
                        window).view(T, H, D)

    base = run(ve)
    t = 10  # inside the document [8, 15)
    first, second = slice(0, H // 2), slice(H // 2, H)
    ve2 = ve.clone().view(T, H, D)
    ve2[t, second] += 3.0  # second members of token t (position 2t+1)
    out = run(ve2.view(T, d))
    assert torch.allclose(out[:t], base[:t], atol=1e-6)
    assert torch.allclose(out[t, first], base[t, first], atol=1e-6), "query 2t must not see key 2t+1"
    assert (out[t, second] - base[t, second]).abs().max() > 1e-2, "query 2t+1 must see key 2t+1"
    assert (out[t + 1, first] - base[t + 1, first]).abs().max() > 1e-2  # 2t+2 sees 2t+1
    assert torch.allclose(out[15:], base[15:], atol=1e-6)  # next documents untouched

    ve3 = ve.clone().view(T, H, D)
    ve3[t, first] += 3.0  # first members of token t (position 2t)
    out = run(ve3.view(T, d))
    assert torch.allclose(out[:t], base[:t], atol=1e-6)
    assert (out[t, first] - base[t, first]).abs().max() > 1e-2
    assert (out[t, second] - base[t, second]).abs().max() > 1e-2, "query 2t+1 sees key 2t"


def test_paired_rotary_follows_head_parity_exactly():
    """ALGORITHM.md 2.8: the q and k handed to attention are the 2T sequence (heads
    0..H/2-1 at slot 2t, H/2..H-1 at 2t+1) with head h of token t rotated at angle position
    2t + h % 2. The reference does this per (slot, head) in float32 from the model's
    pre-rotary q/k (rms-normed projections): equal bit for bit."""
    T = 40
    attn, rot, x, _, sa, attn_gate, _ = paired_setup(seed=16, T=T)
    d, H, D = attn.dim, attn.num_heads, attn.head_dim
    rec = AttnRecorder()
    with torch.no_grad():
        call_attn(attn, x, None, sa, attn_gate, None, rot, rec, cu_tensor([0, T]), T, 10 ** 6)
        qkv = F.linear(x, sa[0] * attn.qkvo[:3 * d].float()).view(T, 3, H, D)
        q, k = (F.rms_norm(qkv[:, i], (D,)) for i in (0, 1))
    call = rec.calls[0]
    for name, t in (("q", q), ("k", k)):
        pairs = to_pairs(t)
        exp = ref_rotate_paired(pairs, ref_freqs(D))
        assert call[name].dtype == torch.float32 and torch.equal(call[name], exp), f"{name}: not the parity rule"
        # rotating by slot instead would change exactly the pair (1, 4)
        by_slot = ref_rotate(pairs, range(2 * T), ref_freqs(D))
        for j in range(H // 2):
            same = torch.equal(by_slot[:, j], exp[:, j])
            assert same == (j != 1), f"{name}: pair {j} should {'' if j != 1 else 'not '}match slot rotation"


# ------------------------------------------------------------------------------------
# 6. YaRN
# ------------------------------------------------------------------------------------

def rotary_readout(rot, P):
    """Reads the tables through the module: (a, b) = (1, 0) in every pair gives
    (cos, -sin), (0, 1) gives (sin, cos); the unrotated half stays 1."""
    D = rot.head_dim
    x = torch.zeros(P, 2, D)
    x[:, 0, 0:D // 2:2] = 1
    x[:, 1, 1:D // 2:2] = 1
    x[:, :, D // 2:] = 1
    return f64(rot(x))


def check_rotary_state(rot, freqs32, freqs64, scale, P):
    """rot's frequencies equal the float32 reference bit for bit (and the float64 loop to
    float32 rounding), its tables equal ALGORITHM.md 2.9's float32-then-bf16 tables exactly, and the
    tables are cos/sin of the float64 angles to bf16 rounding."""
    D = rot.head_dim
    assert rot.attn_scale == pytest.approx(scale, rel=1e-12, abs=0)
    assert rot.freqs.dtype == torch.float32 and torch.equal(rot.freqs, freqs32), "frequencies (float32, bitwise)"
    assert_close(rot.freqs, torch.tensor(freqs64, dtype=F64), atol=0, rtol=1e-6, msg="frequencies vs float64")
    y = rotary_readout(rot, P)
    got = dict(cos_a=y[:, 0, 0:D // 2:2], msin=y[:, 0, 1:D // 2:2], sin=y[:, 1, 0:D // 2:2], cos_b=y[:, 1, 1:D // 2:2])
    cos, sin = ref_cos_sin(range(P), freqs32)
    exp = dict(cos_a=cos, msin=-sin, sin=sin, cos_b=cos)
    ang = torch.arange(P, dtype=F64)[:, None] * torch.tensor(freqs64, dtype=F64)[None, :]
    approx = dict(cos_a=ang.cos(), msin=-ang.sin(), sin=ang.sin(), cos_b=ang.cos())
    for name in got:
        assert torch.equal(got[name], exp[name]), f"{name}: tables differ from the float32 reference"
        # float32 angles drift from float64 ones by ~P * 2^-24 radians at position P
        assert_close(got[name], approx[name], atol=P * 2 ** -23, rtol=2 ** -8, msg=f"{name} vs float64 angles")
    assert torch.equal(y[:, :, D // 2:], torch.ones(P, 2, D // 2, dtype=F64))


def test_rotary_tables_are_float32_then_bf16():
    """ALGORITHM.md 2.9: the tables are built with float32 positions, torch.outer and cos/sin in
    float32, then bf16; float64 angles would give other bf16 values at large positions."""
    P = 2 * 24 * 2048  # the record's paired tables: 2 x the 48k-token packed sequence
    rot = tg.YaRNRotary(128, P, 128)
    freqs = ref_freqs(128)
    ang = torch.outer(torch.arange(P, dtype=torch.float32), freqs)
    half = torch.ones(P, 64)
    f1 = torch.cat([ang.cos().repeat_interleave(2, dim=1), half], dim=1).to(torch.bfloat16)
    f2 = torch.cat([torch.stack([ang.sin(), -ang.sin()], dim=2).flatten(1), 0 * half], dim=1).to(torch.bfloat16)
    assert torch.equal(rot.factor1, f1) and torch.equal(rot.factor2, f2)
    ang64 = torch.outer(torch.arange(P, dtype=F64), freqs.double())
    assert not torch.equal(rot.factor1[:, :64:2], ang64.cos().to(torch.bfloat16)), "float64 would differ"


def test_yarn_record_schedule():
    P = 2048
    rot = tg.YaRNRotary(128, P, 128)
    freqs32, scale = ref_freqs(128), 0.1
    freqs64 = [float(f) for f in freqs32]
    check_rotary_state(rot, freqs32, freqs64, scale, P)
    initial = (rot.factor1.clone(), rot.factor2.clone())
    for old, new in [(3, 7), (7, 11), (11, 13)]:
        rot.update_window(old, new)
        freqs32 = yarn_ref_f32(freqs32, old, new, 128)
        freqs64, scale = yarn_ref(freqs64, scale, old, new, 128)
        check_rotary_state(rot, freqs32, freqs64, scale, P)
    expected = 0.1 * (0.2 * math.log(7 / 3) + 1) * (0.2 * math.log(11 / 7) + 1) * (0.2 * math.log(13 / 11) + 1)
    assert rot.attn_scale == pytest.approx(expected, rel=1e-12)
    assert freqs64[0] == pytest.approx(1.0) and freqs64[-1] < (1 / 1024) * 3 / 13 * 1.0001  # high f kept, low f stretched
    rot.reset()
    check_rotary_state(rot, ref_freqs(128), [float(f) for f in ref_freqs(128)], 0.1, P)
    assert torch.equal(rot.factor1, initial[0]) and torch.equal(rot.factor2, initial[1])


def test_set_windows_updates_yarn_on_the_model():
    model = tiny_model(seed=13)
    a = model.args
    P = 256
    freqs32, scale = ref_freqs(a.head_dim), 0.1
    freqs64 = [float(f) for f in freqs32]
    initial = (model.rotary.factor1.clone(), model.rotary.factor2.clone())
    model.set_windows(1, 3)  # no change of the long window: nothing happens
    check_rotary_state(model.rotary, freqs32, freqs64, scale, P)
    for short, long in [(3, 7), (5, 11), (6, 13)]:
        old = model.windows[1]
        model.set_windows(short, long)
        freqs32 = yarn_ref_f32(freqs32, old, long, a.block_size)
        freqs64, scale = yarn_ref(freqs64, scale, old, long, a.block_size)
        check_rotary_state(model.rotary, freqs32, freqs64, scale, P)
        assert model.windows == (short, long)
    model.set_windows(6, 20, yarn=False)  # final validation window
    assert model.windows == (6, 20)
    check_rotary_state(model.rotary, freqs32, freqs64, scale, P)
    # the forward pass uses the windows and the YaRN scale
    rec = AttnRecorder()
    model = with_attention(model, rec)
    T, cu = 64, [0, 64]
    eval_loss(model, *random_tokens(T, 14), cu)
    for call, layer in zip(rec.calls, ATTN_LAYERS):
        assert call["window"] == (20 if layer in LONG else 6) * a.block_size
        assert call["scale"] == pytest.approx(scale, rel=1e-12)
    model.rotary.reset()
    check_rotary_state(model.rotary, ref_freqs(a.head_dim), [float(f) for f in ref_freqs(a.head_dim)], 0.1, P)
    assert torch.equal(model.rotary.factor1, initial[0]) and torch.equal(model.rotary.factor2, initial[1])


# ------------------------------------------------------------------------------------
# 7. the whole forward pass, smear, skip, backout, gates, value embeddings
# ------------------------------------------------------------------------------------

def record_inputs(monkeypatch, name):
    """Replaces train_gpt.<name> by a wrapper that keeps a copy of each argument."""
    store = []
    orig = getattr(tg, name)

    def rec(x):
        store.append(x.detach().clone())
        return orig(x)

    monkeypatch.setattr(tg, name, rec)
    return store


@pytest.fixture
def logit_capture(monkeypatch):
    return record_inputs(monkeypatch, "softcap")


@pytest.mark.parametrize("windows", [(1, 3), (3, 7)])
def test_full_forward_matches_reference(windows, logit_capture):
    model = tiny_model(seed=20)
    randomize(model, seed=21)
    a = model.args
    freqs, scale = ref_freqs(a.head_dim), 0.1
    if windows != (1, 3):
        model.set_windows(*windows)
        freqs = yarn_ref_f32(freqs, 3, windows[1], a.block_size)
        scale = yarn_ref([], scale, 3, windows[1], a.block_size)[1]
    T = 128
    cu = [0, 1, 30, 31, 100, T, T]
    inp, tgt = random_tokens(T, seed=22)
    ref_logits, _ = ref_forward(model, inp, cu, *windows, freqs=freqs, scale=scale)
    ev = eval_loss(model, inp, tgt, cu)
    assert len(logit_capture) == 1
    assert ref_logits.abs().max() > 5  # nontrivial logits
    assert_close(logit_capture[0], ref_logits, atol=2e-3, rtol=1e-3, msg="logits")
    capped = ref_softcap(ref_logits)
    ref_ce = (torch.logsumexp(capped, -1) - capped[torch.arange(T), tgt]).mean().item()
    assert ev.item() == pytest.approx(ref_ce, rel=1e-4)
    # training mode: summed multi-token loss
    model.train()
    w = [1.0, 0.5, 0.25]
    with torch.no_grad():
        tr = model(inp, tgt, cu_tensor(cu), max_len(cu), torch.tensor(w)).item()
    assert tr == pytest.approx(ref_mtp(capped, tgt, w), rel=1e-4)


def test_smear_mixes_previous_token_into_x0():
    model = tiny_model(seed=30)
    randomize(model, seed=31)
    T, cu = 32, [0, 10, 32]
    inp, tgt = random_tokens(T, seed=32)

    def x0_of(tokens):
        with module_io(model) as (inputs, _):
            eval_loss(model, tokens, tgt, cu)
        # layer 0's attention input is rmsnorm((resid + x0_lambda) * x0) = x0
        return f64(inputs[(0, "attn")])

    emb = f64(model.lm_head)[inp]
    w = f64(model.smear_gate)[0]
    got = {}
    for lam in (0.0, 0.8):
        with torch.no_grad():
            model.scalar_views().smear_lambda.fill_(lam)
        exp = emb.clone()
        for t in range(1, T):
            exp[t] = emb[t] + lam * torch.sigmoid(emb[t, :GATE] @ w) * emb[t - 1]
        got[lam] = x0_of(inp)
        assert_close(got[lam], ref_rmsnorm(exp), atol=1e-5, msg=f"x0 with smear_lambda {lam}")
    assert torch.allclose(got[0.0][0], got[0.8][0], atol=1e-7)  # token 0 unchanged
    assert ((got[0.0][1:] - got[0.8][1:]).abs().amax(-1) > 1e-3).all()  # every later token mixed
    # token t depends on token t-1 only (also across the document boundary at 10)
    for p in (5, 9):
        inp2 = inp.clone()
        inp2[p] = (inp[p] + 1) % 50257
        changed = ((x0_of(inp2) - got[0.8]).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
        assert changed == [p, p + 1]


def test_unet_skip_from_layer3_to_layer6(logit_capture):
    model = tiny_model(seed=40)
    randomize(model, seed=41)
    T, cu = 48, [0, 20, 48]
    inp, tgt = random_tokens(T, seed=42)
    runs = {}
    for skip in (-30.0, 0.3, 30.0):  # gate scale sigmoid(skip) * 2: ~0, 1.15, ~2
        with torch.no_grad():
            model.scalar_views().skip_lambda.fill_(skip)
        with module_io(model) as (inputs, _):
            eval_loss(model, inp, tgt, cu)
        _, ref = ref_forward(model, inp, cu, 1, 3)
        runs[skip] = inputs
        assert_close(inputs[(6, "mlp")], ref["mlp_in"][6], atol=1e-4, msg=f"layer-6 input, skip {skip}")
        assert_close(logit_capture[-1], ref_rmsnorm(ref["pre_final"]) @ f64(model.lm_head).T, atol=2e-3,
                     rtol=1e-3, msg=f"logits, skip {skip}")
    lo, hi = runs[-30.0], runs[30.0]
    for i in range(6):  # layers before 6 do not see the skip
        for kind in ("attn", "mlp"):
            assert torch.equal(lo[(i, kind)], hi[(i, kind)]), (i, kind)
    assert (lo[(6, "mlp")] - hi[(6, "mlp")]).abs().max() > 1e-2
    # with the gate ~0 the layer-6 input is resid * x5 + x0_lambda * x0, no skip term
    sc = scalars(model)
    with torch.no_grad():
        model.scalar_views().skip_lambda.fill_(-30.0)
    _, ref = ref_forward(model, inp, cu, 1, 3)
    x5, x0 = ref["out"][5], ref["x0"]
    no_skip = ref_rmsnorm(sc["resid"][6] * x5 + f64(model.x0_lambda)[6] * x0)
    assert_close(lo[(6, "mlp")], no_skip, atol=1e-4, msg="skip gate closed")


def test_backout_subtracts_layer7_output(monkeypatch):
    model = tiny_model(seed=50)
    randomize(model, seed=51)
    T, cu = 48, [0, 48]
    inp, tgt = random_tokens(T, seed=52)
    seen = record_inputs(monkeypatch, "norm")
    pre_final = {}
    for b in (0.0, 0.4):
        with torch.no_grad():
            model.scalar_views().backout_lambda.fill_(b)
        seen.clear()
        eval_loss(model, inp, tgt, cu)
        pre_final[b] = f64(seen[-1])  # the last rmsnorm is the final one
    _, ref = ref_forward(model, inp, cu, 1, 3)
    x7 = ref["out"][7]
    assert_close(pre_final[0.4] - pre_final[0.0], -0.4 * x7, atol=1e-4, msg="backout term")
    assert_close(pre_final[0.4], ref["pre_final"], atol=1e-4, rtol=1e-4, msg="final pre-norm x")


def test_output_gate_per_layer_mapping():
    """Each attention layer's output is O(y * sigmoid(x[:12] @ G.T)) with G its own row of
    attn_gate_bank (rows in layer order, layer 6 skipped)."""
    model = tiny_model(seed=60)
    randomize(model, seed=61)
    a = model.args
    H, D, d = a.num_heads, a.head_dim, a.model_dim
    T, cu = 32, [0, 12, 32]
    inp, tgt = random_tokens(T, seed=62)
    rec = AttnRecorder()
    model = with_attention(model, rec)
    with module_io(model) as (inputs, outputs):
        eval_loss(model, inp, tgt, cu)
    sa = scalars(model)["sa"]
    for call, layer in zip(rec.calls, ATTN_LAYERS):
        y = f64(call["out"])
        y = from_pairs(y) if layer in PAIRED else y
        x = f64(inputs[(layer, "attn")])
        for j in range(len(ATTN_LAYERS)):
            gate = torch.sigmoid(x[:, :GATE] @ f64(model.attn_gate_bank[j]).T)
            exp = (y * gate[..., None]).reshape(T, d) @ (sa[layer, 1] * f64(model.blocks[layer].attn.qkvo[3 * d:])).T
            match = torch.allclose(f64(outputs[(layer, "attn")]), exp, atol=1e-4)
            assert match == (j == ATTN_LAYERS.index(layer)), (layer, j)


def test_output_gate_closed_and_open():
    """Zero/one gate on a plain attention module: a large negative gate silences it, a
    large positive one passes y unchanged."""
    torch.manual_seed(63)
    d, H, D, T = 96, 6, 16, 16
    attn = tg.Attention(d, H, D, paired=False, key_offset=True)
    with torch.no_grad():
        attn.qkvo.copy_(torch.randn(4 * d, d) * d ** -0.5)
    rot = tg.YaRNRotary(D, 2 * T, 16)
    x = torch.randn(T, d)
    x[:, :GATE] = x[:, :GATE].abs() + 0.1  # gate inputs positive, so sign(G) decides
    sa = torch.tensor([0.9, 1.1])
    cu = [0, 5, T]

    def run(gval):
        gate = torch.full((H, GATE), gval).bfloat16()
        with torch.no_grad():
            return call_attn(attn, x, None, sa, gate, None, rot, tg.attention_sdpa, cu_tensor(cu), max_len(cu), 4)

    open_ref = ref_attention_layer(f64(x), f64(attn.qkvo), 0.9, 1.1, torch.full((H, GATE), 1e4, dtype=F64),
                                   None, None, H, D, cu, 4, 0.1, ref_freqs(D), paired=False, key_offset=True)
    assert open_ref.abs().max() > 0.1
    assert_close(run(40.0), open_ref, atol=1e-4, msg="open gate")
    assert run(-40.0).abs().max() < 1e-6
    assert_close(run(0.0), open_ref / 2, atol=1e-4, msg="gate 0 -> sigmoid 1/2")


def test_value_embeddings_on_the_right_layers():
    """With O = 0 the attention adds nothing to the stream, so turning on one value
    embedding table changes v exactly on the layers that use it, by the gated ve."""
    model = tiny_model(seed=70)
    randomize(model, seed=71, attn_out=False)
    a = model.args
    H, D = a.num_heads, a.head_dim
    T, cu = 32, [0, 7, 32]
    inp, tgt = random_tokens(T, seed=72)
    tables = [t.detach().clone() for t in model.value_embeds]

    def run():
        rec = AttnRecorder()
        twin = with_attention(model, rec)
        with module_io(twin) as (inputs, _):
            eval_loss(twin, inp, tgt, cu)
        return rec.calls, inputs

    with torch.no_grad():
        for t in model.value_embeds:
            t.zero_()
    base, inputs = run()
    for n in range(3):
        with torch.no_grad():
            for m, t in enumerate(model.value_embeds):
                t.copy_(tables[m] if m == n else torch.zeros_like(t))
        calls, inputs_n = run()
        ve = f64(tables[n])[inp].view(T, H, D)
        for c0, c1, layer in zip(base, calls, ATTN_LAYERS):
            assert torch.equal(inputs[(layer, "attn")], inputs_n[(layer, "attn")])
            diff = f64(c1["v"]) - f64(c0["v"])
            if VE_MAP.get(layer) == n:
                x = f64(inputs[(layer, "attn")])
                gate = 2 * torch.sigmoid(x[:, :GATE] @ f64(model.ve_gate_bank[VE_ORDER.index(layer)]).T)
                exp = gate[..., None] * ve
                exp = to_pairs(exp) if layer in PAIRED else exp
                assert_close(diff, exp, atol=1e-5, msg=f"ve{n} on layer {layer}")
                assert exp.abs().max() > 0.1
            else:
                assert diff.abs().max() == 0, f"ve{n} must not reach layer {layer}"


# ------------------------------------------------------------------------------------
# 8. gradient flow and the embed split
# ------------------------------------------------------------------------------------

def test_gradient_flow_and_embed_split():
    model = tiny_model(seed=80)
    randomize(model, seed=81)
    model.train()
    T, cu = 64, [0, 25, 64]
    inp, tgt = random_tokens(T, seed=82)
    w = torch.tensor([1.0, 0.5, 0.25])
    loss = model(inp, tgt, cu_tensor(cu), max_len(cu), w)
    loss.backward()
    for name, p in model.named_parameters():
        if name == "embed":
            assert p.grad is None, "embed is unused before the split"
        else:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    tied_head_grad = f64(model.lm_head.grad)
    model.zero_grad(set_to_none=True)

    model.split_embed()
    assert torch.equal(model.embed, model.lm_head)
    loss2 = model(inp, tgt, cu_tensor(cu), max_len(cu), w)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)  # same function right after the split
    loss2.backward()
    assert model.embed.grad is not None and model.lm_head.grad is not None
    eg, hg = f64(model.embed.grad), f64(model.lm_head.grad)
    used = torch.zeros(V_PAD, dtype=torch.bool)
    used[inp] = True
    assert eg[used].abs().sum() > 0 and eg[~used].abs().max() == 0  # embed: input rows only
    # tied gradient = head part + input part
    assert_close(hg + eg, tied_head_grad, atol=1e-3 * tied_head_grad.abs().max().item(), rtol=2e-2,
                 msg="tied grad split")
    # the input path now reads embed: x0 = rmsnorm(smear(embed[tokens]))
    with torch.no_grad():
        model.embed.add_(torch.randn(model.embed.shape) * 0.3)
        model.scalar_views().smear_lambda.fill_(0.0)
    with module_io(model) as (inputs, _):
        eval_loss(model, inp, tgt, cu)
    assert_close(inputs[(0, "attn")], ref_rmsnorm(f64(model.embed)[inp]), atol=1e-5, msg="x0 from embed")


# ------------------------------------------------------------------------------------
# 9. multi-token prediction loss and softcap
# ------------------------------------------------------------------------------------

def old_mtp_loss(logits, targets, weights):
    """The loss as first written (one gather and scatter-backward per offset), in float32."""
    capped = ref_softcap_f32(logits.float())
    T = capped.size(0)
    lse = torch.logsumexp(capped, dim=-1)
    loss = capped.new_zeros(())
    for k in range(weights.size(0)):
        picked = capped[: T - k].gather(1, targets[k:, None]).squeeze(1)
        loss = loss + weights[k] * (lse[: T - k] - picked).sum()
    return loss


def ref_softcap_f32(z):
    return 23 * torch.sigmoid((z + 5) / 7.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mtp_loss_value_and_gradient_match_float64_reference(dtype):
    """ALGORITHM.md 2.6: sum_t sum_k w[k] CE(softcap(logits)_t, target_{t+k}) in float32 from the
    raw logits; value and gradient against autograd of a float64 reference, and against the
    loss as first written (per-offset gather) in float32."""
    g = torch.Generator().manual_seed(90)
    T, V = 20, 37
    raw = (torch.randn(T, V, generator=g) * 8).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    for weights in ([1.0], [1.0, 0.5], [1.0, 0.5, 0.25], [0.3, 0.0, 2.0]):
        w = torch.tensor(weights)
        x64 = raw.double().requires_grad_()
        capped = ref_softcap(x64)
        ref = sum(wk * F.cross_entropy(capped[:T - k], targets[k:], reduction="sum") for k, wk in enumerate(weights))
        ref.backward(torch.tensor(1.7, dtype=F64))
        assert ref.item() == pytest.approx(ref_mtp(capped.detach(), targets, weights), rel=1e-12)
        x = raw.clone().requires_grad_()
        got = tg.mtp_loss(x, targets, w)
        got.backward(torch.tensor(1.7))
        assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-5)
        assert x.grad.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        assert_close(x.grad, x64.grad, atol=tol * x64.grad.abs().max().item(), rtol=tol, msg=f"grad {weights}")
        y = raw.float().clone().requires_grad_()
        old = old_mtp_loss(y, targets, w)
        old.backward(torch.tensor(1.7))
        assert got.item() == pytest.approx(old.item(), rel=1e-6)
        if dtype == torch.float32:
            assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5, msg="vs the per-offset definition")


def test_softcap_formula():
    z = torch.linspace(-80, 80, 1601)
    assert_close(tg.softcap(z), ref_softcap(z.double()), atol=1e-5, rtol=1e-6, msg="softcap")
    assert tg.softcap(torch.tensor(-5.0)).item() == pytest.approx(11.5)


# ------------------------------------------------------------------------------------
# 10. FP8 head
# ------------------------------------------------------------------------------------

def test_fp8_not_supported_on_cpu():
    ok, msg = tg.fp8_supported("cpu")
    assert ok is False and isinstance(msg, str) and msg
    plan = tg.resolve_plan(tiny_args(attn_backend="sdpa"), "cpu")
    assert plan.fp8 is False and plan.act_dtype == torch.float32
    with pytest.raises(tg.ConfigError, match="--fp8=on: FP8 lm_head needs a CUDA GPU"):
        tg.resolve_plan(tiny_args(attn_backend="sdpa", fp8="on"), "cpu")


def _scaled_mm_runs(device):
    """FP8 matmuls run on CUDA with compute capability >= 8.9, and on CPU in recent torch."""
    if device == "cuda":
        return CUDA and tg.fp8_supported("cuda")[0]
    try:
        a = torch.ones(16, 16, dtype=torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32)
        torch._scaled_mm(a, a.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


FP8_DEVICES = [pytest.param(d, marks=pytest.mark.skipif(not _scaled_mm_runs(d), reason=f"no FP8 matmul on {d}"))
               for d in ("cpu", "cuda")]


@pytest.mark.parametrize("device", FP8_DEVICES)
def test_fp8_mm_matches_quantized_reference(device):
    """The record's FP8 lm_head path (on CPU too, where torch has FP8 matmuls, though the
    model only uses it on GPUs): forward and both gradients vs float64 products of the
    e4m3 / e5m2-quantized operands."""
    if device == "cuda":
        assert tg.fp8_supported("cuda")[0]
    g = torch.Generator(device=device).manual_seed(100)
    x = torch.randn(128, 256, device=device, generator=g).bfloat16()
    w = (torch.randn(512, 256, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
    x.requires_grad_()
    xs, ws, gs = tg.FP8_X_SCALE, tg.FP8_W_SCALE, tg.FP8_GRAD_SCALE
    out = tg.fp8_mm(x, w, xs, ws, gs)[0]
    assert out.dtype == torch.bfloat16

    def q(t, s, dt):  # ALGORITHM.md 2.12: t / s in t's dtype (bf16), then cast; the products in float64
        return (t.detach() / s).to(dt).double() * s

    xq, wq = q(x, xs, torch.float8_e4m3fn), q(w, ws, torch.float8_e4m3fn)
    ref = xq @ wq.T
    assert (out.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
    grad = torch.randn(out.shape, device=device, generator=g).bfloat16() * 1e-3
    out.backward(grad)
    gq = q(grad, gs, torch.float8_e5m2)
    for got, exp in ((x.grad, gq @ wq), (w.grad, gq.T @ xq)):
        assert got.shape == exp.shape
        assert (got.double() - exp).abs().max() <= 2e-2 * exp.abs().max()


@pytest.mark.parametrize("device", FP8_DEVICES)
def test_fp8_ops_fake_tensors_match_real_outputs(device):
    """torch.compile plans memory from the ops' fake implementations: their shapes, dtypes
    and strides must be those of the real outputs (grad_w is column-major)."""
    g = torch.Generator(device=device).manual_seed(101)
    x = torch.randn(64, 32, device=device, generator=g).bfloat16()
    w = torch.randn(128, 32, device=device, generator=g).bfloat16()
    scales = (tg.FP8_X_SCALE, tg.FP8_W_SCALE, tg.FP8_GRAD_SCALE)
    out, x_f8, w_f8 = torch.ops.train_gpt.fp8_mm(x, w, *scales)
    grad = torch.randn(out.shape, device=device, generator=g).bfloat16()
    for op, args in ((torch.ops.train_gpt.fp8_mm.default, (x, w, *scales)),
                     (torch.ops.train_gpt.fp8_mm_backward.default, (grad, x_f8, w_f8, *scales))):
        result = torch.library.opcheck(op, args, test_utils=("test_faketensor",))
        assert result == {"test_faketensor": "SUCCESS"}, (op, result)


# ------------------------------------------------------------------------------------
# 10. the validation metric's op order (ALGORITHM.md 2.6)
# ------------------------------------------------------------------------------------

def record_val_loss(x, W, targets):
    """The record's validation loss, written out: the softcap in the activation dtype, only
    its result cast to float32, then the mean cross-entropy."""
    return F.cross_entropy((23 * torch.sigmoid((F.linear(x, W) + 5) / 7.5)).float(), targets)


def float32_softcap_val_loss(x, W, targets):
    return F.cross_entropy(ref_softcap_f32(F.linear(x, W).float()), targets)


def test_bf16_validation_loss_uses_the_record_op_order():
    """Eager, bf16 activations: the model's eval loss is the record's op order to the bit,
    and at these shapes that number differs from a float32 softcap of the same logits."""
    model = tiny_model(seed=100, plan=dict(act_dtype=torch.bfloat16))
    randomize(model, seed=101)
    T = 256
    cu = [0, 40, 41, 200, T]
    inp, tgt = random_tokens(T, seed=102)
    with torch.no_grad():
        model.lm_head.mul_(40)  # logits of std ~5, where the two orders are far apart
        x = model.hidden(inp.to(torch.int32), cu_tensor(cu), max_len(cu))
        W = model.lm_head.bfloat16()
        assert x.dtype == torch.bfloat16 and F.linear(x, W).float().std() > 2
        ref = record_val_loss(x, W, tgt)
        other = float32_softcap_val_loss(x, W, tgt)
    got = eval_loss(model, inp, tgt, cu)
    assert got.dtype == torch.float32 and torch.equal(got, ref), (got.item(), ref.item())
    assert abs(ref.item() - other.item()) > 1e-4, (ref.item(), other.item())


def test_compiled_validation_loss_equals_the_record_op_order_compiled():
    """Compiled on CPU (inductor's own bf16/fp32 mix): the head's validation loss equals the
    record's op order compiled the same way, bitwise, for logits of std 2 and 6."""
    g = torch.Generator().manual_seed(103)
    T, d, V = 512, 64, V_PAD
    W = (torch.randn(V, d, generator=g) / d ** 0.5).bfloat16()
    targets = torch.randint(0, V, (T,), generator=g)
    got_fn = torch.compile(tg.validation_loss, fullgraph=True, dynamic=False)
    ref_fn = torch.compile(record_val_loss, fullgraph=True, dynamic=False)
    for std in (2.0, 6.0):
        x = (torch.randn(T, d, generator=g) * std).bfloat16()
        got, ref = got_fn(x, W, targets), ref_fn(x, W, targets)
        assert torch.equal(got, ref), (std, got.item(), ref.item())


# ------------------------------------------------------------------------------------
# 11. the fused loss head's place in the model and its start-up choice
# ------------------------------------------------------------------------------------

def test_training_forward_takes_the_fused_head_when_chosen(monkeypatch):
    """With the plan's fused_loss set to a path, the training loss is fused_loss_head(x,
    lm_head, targets, mtp weights, the backward's gradient scale) in that path's number of
    passes, compiled as the plan says: the kernels themselves are checked under the
    interpreter (tools/fused_kernels_check.py). Off (None), the head is the unfused one."""
    unfused_model = tiny_model(seed=110)
    randomize(unfused_model, seed=111)
    T = 32
    cu = [0, 10, T]
    inp, tgt = random_tokens(T, seed=112)
    w = torch.tensor([1.0, 0.5, 0.25])
    unfused_model.train()
    with torch.no_grad():
        unfused = unfused_model(inp, tgt, cu_tensor(cu), max_len(cu), w)
        x = unfused_model.hidden(inp, cu_tensor(cu), max_len(cu))
    calls = []
    monkeypatch.setattr(tg, "fused_loss_head", lambda *a, **k: calls.append((a, k)) or torch.tensor(7.0))
    for path, one_pass in (("one pass", True), ("two passes", False)):
        model = tg.build_model(unfused_model.args, tiny_plan(fused_loss=path))
        model.load_state_dict(unfused_model.state_dict())
        model.train()
        assert model.loss_grad_scale == 0.125  # 1 / grad_accum of one process
        with torch.no_grad():
            assert model(inp, tgt, cu_tensor(cu), max_len(cu), w).item() == 7.0
        ((xa, wa, ta, ma, sa), kw), = calls
        assert torch.equal(xa, x) and wa is model.lm_head and ta is tgt and ma is w and sa == 0.125
        assert kw == {"one_pass": one_pass, "compiled": False}
        calls.clear()
    with torch.no_grad():
        assert torch.equal(unfused_model(inp, tgt, cu_tensor(cu), max_len(cu), w), unfused)


def test_trainer_tells_the_head_the_gradient_scale_of_its_backward(tmp_path):
    """train_step runs (loss / grad_accum).backward(): the head is told 1 / grad_accum (1/8
    for one process); on CPU the plan keeps the unfused head and MLP and says why."""
    lines = []
    trainer = tg.Trainer(tg.parse_args(["--preset=tiny", f"--log_dir={tmp_path}"]), 0, 1, torch.device("cpu"),
                         lambda m="", **k: lines.append(m))
    assert trainer.model.loss_grad_scale == 1 / 8 == 1 / trainer.grad_accum and not trainer.plan.fused_loss
    table = "\n".join(lines)
    assert "fused loss head needs a CUDA GPU or TRITON_INTERPRET=1 (device is cpu)" in table
    assert not any(b.mlp.fused for b in trainer.model.blocks)
    assert "fused MLP needs a CUDA GPU or TRITON_INTERPRET=1 (device is cpu)" in table


def test_mlp_takes_the_fused_matmuls_when_chosen(monkeypatch):
    """With the plan's fused_mlp every MLP computes fused_mlp(x, c_fc, c_proj) (the kernels
    are checked under the interpreter, tools/fused_kernels_check.py); off, the record's MLP,
    bitwise."""
    model = tiny_model(seed=120)
    randomize(model, seed=121)
    x = torch.randn(16, model.args.model_dim, generator=torch.Generator().manual_seed(122))
    mlp = model.blocks[4].mlp
    with torch.no_grad():
        ref = torch.relu(x.double() @ f64(mlp.c_fc).T).square() @ f64(mlp.c_proj)
        before = mlp(x)
    assert_close(before, ref, atol=1e-4, rtol=1e-4, msg="unfused MLP")
    calls = []
    monkeypatch.setattr(tg, "fused_mlp", lambda *a: calls.append(a) or a[0])
    fused_model = tg.build_model(model.args, tiny_plan(fused_mlp=True))
    fused_model.load_state_dict(model.state_dict())
    assert all(b.mlp.fused for b in fused_model.blocks) and not any(b.mlp.fused for b in model.blocks)
    with torch.no_grad():
        assert fused_model.blocks[4].mlp(x) is x
    (xa, fa, pa), = calls
    assert xa is x and torch.equal(fa, mlp.c_fc.float()) and torch.equal(pa, mlp.c_proj.float())
    with torch.no_grad():
        assert torch.equal(mlp(x), before)
