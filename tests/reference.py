"""Independent references for tests/test_model.py: the model of ALGORITHM.md section 2 in
float64, written from that text with Python loops, explicit masks and formulas, never from
train_gpt.py's code (it reads only the model's parameters and public helpers such as
tg.Scalars to find them)."""
import math

import numpy as np
import torch

import train_gpt as tg

F64 = torch.float64
V_PAD = 50304  # 50257 padded to the next multiple of 128
GATE = 12
# ALGORITHM.md section 2, written out here rather than read from the code
ATTN_LAYERS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]  # every layer but 6; also the gate bank order
PAIRED = {0, 2, 5, 9}
LONG = {3, 10}
VE_MAP = {0: 1, 1: 2, 8: 0, 9: 1, 10: 2}  # layer -> value embedding table
VE_ORDER = [0, 1, 8, 9, 10]  # ve_gate_bank rows
EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default eps for float32 activations


def f64(t):
    return t.detach().to(F64).cpu()


def bf16_round(t):
    return t.to(torch.bfloat16).to(F64)


def scalars(model):
    sc = tg.Scalars(f64(model.scalars))
    return dict(
        resid=sc.resid_lambda,
        sa=sc.sa_lambda,
        smear=sc.smear_lambda.item(),
        backout=sc.backout_lambda.item(),
        skip=sc.skip_lambda.item(),
    )




# ------------------------------------------------------------------------------------
# independent references (float64)
# ------------------------------------------------------------------------------------

def ref_rmsnorm(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def ref_freqs(head_dim):
    """ALGORITHM.md 2.9: f = (1/1024) ** linspace(0, 1, head_dim/4), in float32."""
    return (1 / 1024) ** torch.linspace(0, 1, head_dim // 4, dtype=torch.float32)


def ref_cos_sin(positions, freqs):
    """ALGORITHM.md 2.9's bf16 tables at `positions`: angles outer(positions, f) in float32, cos and
    sin in float32, then rounded to bf16 (returned as float64)."""
    ang = torch.outer(torch.tensor(list(positions), dtype=torch.float32), torch.as_tensor(freqs, dtype=torch.float32))
    return bf16_round(ang.cos()), bf16_round(ang.sin())


def ref_rotate(x, positions, freqs):
    """x: (N, heads, D), row n at position positions[n]. Channel pairs (2j, 2j+1) of the
    first D/2 channels: (a, b) -> (a cos + b sin, b cos - a sin), angle p * f_j, with
    cos/sin from the bf16 tables (ref_cos_sin); the last D/2 channels pass through."""
    out = x.clone()
    cos, sin = (t.to(x.dtype) for t in ref_cos_sin(positions, freqs))  # bf16 values: exact in x's dtype
    for j in range(len(freqs)):
        c, s = cos[:, j:j + 1], sin[:, j:j + 1]
        a, b = x[:, :, 2 * j], x[:, :, 2 * j + 1]
        out[:, :, 2 * j] = a * c + b * s
        out[:, :, 2 * j + 1] = b * c - a * s
    return out


def ref_rotate_paired(x2, freqs):
    """Rotary on the paired (2T, H/2, D) sequence by HEAD INDEX PARITY (ALGORITHM.md 2.8, paired
    heads): slot 2t + s, pair j holds head h = j + s*H/2 of token t, which rotates at angle
    position 2t + (h % 2), whatever its slot."""
    out = x2.clone()
    hp = x2.shape[1]
    for p in range(x2.shape[0]):
        t, s = divmod(p, 2)
        for j in range(hp):
            h = j + s * hp
            out[p:p + 1, j:j + 1] = ref_rotate(x2[p:p + 1, j:j + 1], [2 * t + h % 2], freqs)
    return out


def ref_doc_ids(cu, T):
    ids = []
    for p in range(T):
        doc = None
        for n, c in enumerate(cu):
            if c <= p:
                doc = n
        ids.append(doc)
    return ids


_MASKS = {}


def ref_mask(T, cu, window):
    """Explicit (T, T) mask: key j visible to query i iff same document and i-w <= j <= i."""
    key = (T, tuple(cu), window)
    if key not in _MASKS:
        doc = ref_doc_ids(cu, T)
        rows = [[doc[i] == doc[j] and i - window <= j <= i for j in range(T)] for i in range(T)]
        _MASKS[key] = torch.tensor(rows, dtype=torch.bool)
    return _MASKS[key]


def ref_attend(q, k, v, mask, scale):
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", p, v)


def loop_attention(q, k, v, cu, window, scale):
    """Python loops over heads, queries and keys in float64. Returns the output (T, H, D)
    and the attention probabilities (T, H, T)."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    T, H, D = q.shape
    doc = ref_doc_ids(cu, T)
    out = np.zeros((T, H, D))
    probs = np.zeros((T, H, T))
    for h in range(H):
        for i in range(T):
            keys = [j for j in range(T) if doc[j] == doc[i] and i - window <= j <= i]
            logits = [scale * float(np.dot(q[i, h], k[j, h])) for j in keys]
            m = max(logits)
            w = [math.exp(l - m) for l in logits]
            z = sum(w)
            for j, wj in zip(keys, w):
                probs[i, h, j] = wj / z
                out[i, h] += (wj / z) * v[j, h]
    return out, probs


def to_pairs(x):
    """(T, H, D) -> (2T, H/2, D): position 2t holds heads 0..H/2-1 of token t, position
    2t+1 holds heads H/2..H-1 (explicit loops)."""
    T, H, D = x.shape
    hp = H // 2
    out = x.new_zeros(2 * T, hp, D)
    for t in range(T):
        for h in range(hp):
            out[2 * t, h] = x[t, h]
            out[2 * t + 1, h] = x[t, h + hp]
    return out


def from_pairs(y):
    T2, hp, D = y.shape
    T = T2 // 2
    out = y.new_zeros(T, 2 * hp, D)
    for t in range(T):
        for h in range(hp):
            out[t, h] = y[2 * t, h]
            out[t, h + hp] = y[2 * t + 1, h]
    return out


def shift_keys(k):
    """Partial key offset by hand: channels [D/4, D/2) and [3D/4, D) of position t take
    position t-1's values for t >= 1."""
    T, H, D = k.shape
    out = k.clone()
    for t in range(1, T):
        out[t, :, D // 4:D // 2] = k[t - 1, :, D // 4:D // 2]
        out[t, :, 3 * D // 4:] = k[t - 1, :, 3 * D // 4:]
    return out


def ref_qkv(x, W, sa0, H, D):
    d = H * D
    T = x.shape[0]
    q = (x @ (sa0 * W[:d]).T).view(T, H, D)
    k = (x @ (sa0 * W[d:2 * d]).T).view(T, H, D)
    v = (x @ (sa0 * W[2 * d:3 * d]).T).view(T, H, D)
    return ref_rmsnorm(q), ref_rmsnorm(k), v


def ref_attention_layer(x, W, sa0, sa1, attn_gate, ve, ve_gate, H, D, cu, window, scale, freqs,
                        paired, key_offset):
    """ALGORITHM.md 2.7, float64. x: (T, d), W: qkvo (4d, d)."""
    T = x.shape[0]
    d = H * D
    q, k, v = ref_qkv(x, W, sa0, H, D)
    gin = x[:, :GATE]
    if ve is not None:
        v = v + 2 * torch.sigmoid(gin @ ve_gate.T)[..., None] * ve.view(T, H, D)
    if paired:
        q2, k2, v2 = to_pairs(q), to_pairs(k), to_pairs(v)
        q2, k2 = ref_rotate_paired(q2, freqs), ref_rotate_paired(k2, freqs)
        mask = ref_mask(2 * T, [2 * c for c in cu], window)
        y = from_pairs(ref_attend(q2, k2, v2, mask, scale))
    else:
        q, k = ref_rotate(q, range(T), freqs), ref_rotate(k, range(T), freqs)
        if key_offset:
            k = shift_keys(k)
        y = ref_attend(q, k, v, ref_mask(T, cu, window), scale)
    y = y * torch.sigmoid(gin @ attn_gate.T)[..., None]
    return y.reshape(T, d) @ (sa1 * W[3 * d:]).T


def ref_forward(model, tokens, cu, short_blocks, long_blocks, freqs=None, scale=0.1, use_embed=False):
    """The whole forward pass of ALGORITHM.md section 2 in float64, from the model's parameters.
    Returns logits before the softcap and a dict of intermediate values."""
    a = model.args
    H, D, d, bs = a.num_heads, a.head_dim, a.model_dim, a.block_size
    freqs = ref_freqs(D) if freqs is None else freqs
    sc = scalars(model)
    x0l = f64(model.x0_lambda)
    cu = [int(c) for c in cu]
    tokens = [int(t) for t in tokens]
    T = len(tokens)
    emb = f64(model.embed if use_embed else model.lm_head)[tokens]
    ves = [f64(t)[tokens] for t in model.value_embeds]
    w_smear = f64(model.smear_gate)[0]
    x = emb.clone()
    for t in range(1, T):
        x[t] = emb[t] + sc["smear"] * torch.sigmoid(emb[t, :GATE] @ w_smear) * emb[t - 1]
    x0 = ref_rmsnorm(x)
    x = x0
    inter = dict(x0=x0, attn_in={}, mlp_in={}, attn_out={}, out={})
    for i in range(11):
        if i == 6:
            g = 2 * torch.sigmoid(torch.tensor(sc["skip"], dtype=F64)) * torch.sigmoid(x0[:, :GATE] @ f64(model.skip_gate)[0])
            x = x + g[:, None] * inter["out"][3]
        x = (sc["resid"][0] + x0l[0]) * x if i == 0 else sc["resid"][i] * x + x0l[i] * x0
        blk = model.blocks[i]
        if i != 6:
            xin = ref_rmsnorm(x)
            inter["attn_in"][i] = xin
            window = (long_blocks if i in LONG else short_blocks) * bs
            ve = ves[VE_MAP[i]] if i in VE_MAP else None
            ve_gate = f64(model.ve_gate_bank[VE_ORDER.index(i)]) if i in VE_MAP else None
            y = ref_attention_layer(xin, f64(blk.attn.qkvo), sc["sa"][i, 0], sc["sa"][i, 1],
                                    f64(model.attn_gate_bank[ATTN_LAYERS.index(i)]), ve, ve_gate,
                                    H, D, cu, window, scale, freqs, paired=i in PAIRED, key_offset=i in LONG)
            inter["attn_out"][i] = y
            x = x + y
        xin = ref_rmsnorm(x)
        inter["mlp_in"][i] = xin
        x = x + torch.relu(xin @ f64(blk.mlp.c_fc).T) ** 2 @ f64(blk.mlp.c_proj)
        inter["out"][i] = x
    xf = x - sc["backout"] * inter["out"][7]
    inter["pre_final"] = xf
    return ref_rmsnorm(xf) @ f64(model.lm_head).T, inter


def ref_softcap(z):
    return 23.0 / (1.0 + torch.exp(-(z + 5.0) / 7.5))


def ref_mtp(capped, targets, weights):
    """sum_t sum_k w[k] * CE(logits_t, target_{t+k}) with explicit loops (float64)."""
    T = capped.shape[0]
    lse = torch.logsumexp(capped, dim=-1)
    total = 0.0
    for k, w in enumerate(weights):
        for t in range(T - k):
            total += w * (lse[t] - capped[t, int(targets[t + k])]).item()
    return total


def yarn_ref(freqs, scale, old, new, block):
    """ALGORITHM.md 2.9, YaRN update, written as a float64 loop (the meaning of the update)."""
    out = []
    for f in freqs:
        r = block * old * f / (2 * math.pi)
        s = old / new
        w = min(max((r - 1) / (32 - 1), 0.0), 1.0)
        out.append(f * (s + w * (1 - s)))
    return out, scale * (0.2 * math.log(new / old) + 1)


def yarn_ref_f32(freqs, old, new, block):
    """The same update with the record's rounding (ALGORITHM.md 2.9): float32 tensor math on the
    float32 frequencies, r = block*old*f/(2 pi), s = old/new, w = clamp((r-1)/31, 0, 1)."""
    f = torch.as_tensor(freqs, dtype=torch.float32)
    r = block * old * f / (2 * math.pi)
    s = old / new
    w = ((r - 1) / (32 - 1)).clamp(0, 1)
    return f * (s + w * (1 - s))


def assert_close(got, exp, atol, rtol=0.0, msg=""):
    got, exp = f64(got), f64(exp)
    assert got.shape == exp.shape, f"{msg}: shape {tuple(got.shape)} vs {tuple(exp.shape)}"
    err = (got - exp).abs()
    bound = atol + rtol * exp.abs()
    assert bool((err <= bound).all()), f"{msg}: max abs error {err.max().item():.3g} (atol {atol}, rtol {rtol})"
