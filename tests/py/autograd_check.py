#!/usr/bin/env python3
"""dL/d(hidden) of moa-profile's backward pass against PyTorch autograd on the same weights.

    moa-profile grads -m MODEL --data calib.jsonl --index 0 --max-tokens 1024 -o grads.bin
    python3 tests/py/autograd_check.py --model MODEL --grads grads.bin [--device cuda]

Independent of moa: the GGUF is read and dequantized by gguf-py, and the llama forward pass
(RMSNorm, rotary embedding on adjacent pairs as llama.cpp applies it for this architecture,
grouped-query causal attention, SwiGLU MLP, tied or separate output) is written here in torch in
float64. The loss is the mean cross-entropy over the response tokens moa used (from the grads
file's header); autograd gives dL/d(input hidden) of every layer, compared with moa's per layer
(relative L2 error). Exit status 1 when the mean relative error exceeds --tol (default 1e-3).
Runs where torch is installed (the GPU machine); moa itself is not needed there.
"""
import argparse
import json
import sys

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - reported, not hidden
    print("SKIP: torch is not installed", file=sys.stderr)
    sys.exit(0)
import gguf


def load(path):
    r = gguf.GGUFReader(path)
    kv = {}
    for f in r.fields.values():
        if f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            v = f.parts[f.data[0]]
            kv[f.name] = bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]
    arch = kv["general.architecture"]
    t = {}
    for ten in r.tensors:
        a = gguf.quants.dequantize(ten.data, ten.tensor_type).astype(np.float64)
        shape = [int(d) for d in reversed(ten.shape.tolist())]
        t[ten.name] = a.reshape(shape)
    return arch, kv, t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--grads", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()

    raw = open(args.grads, "rb").read()
    nl = raw.index(b"\n")
    hdr = json.loads(raw[:nl])
    n, e, L = hdr["n_tokens"], hdr["n_embd"], hdr["n_layer"]
    moa = np.frombuffer(raw[nl + 1 :], dtype="<f4").reshape(L, n, e)

    arch, kv, w = load(args.model)
    dev = torch.device(args.device)
    T = lambda name: torch.tensor(w[name], dtype=torch.float64, device=dev)
    H = int(kv[f"{arch}.attention.head_count"])
    Hk = int(kv[f"{arch}.attention.head_count_kv"])
    eps = float(kv[f"{arch}.attention.layer_norm_rms_epsilon"])
    base = float(kv.get(f"{arch}.rope.freq_base", 10000.0))
    D = e // H
    n_rot = int(kv.get(f"{arch}.rope.dimension_count", D))
    assert L == int(kv[f"{arch}.block_count"])

    tokens = torch.tensor(hdr["tokens"], device=dev)
    pos = torch.arange(n, dtype=torch.float64, device=dev)
    inv = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64, device=dev) / n_rot)
    if "rope_freqs.weight" in w:
        inv = inv / T("rope_freqs.weight")
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()

    def rope(x, heads):  # x: (n, heads*D), adjacent pairs of the first n_rot dims
        x = x.view(n, heads, D)
        r = x[..., :n_rot].reshape(n, heads, n_rot // 2, 2)
        a, b = r[..., 0], r[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        rot = torch.stack((a * c - b * s, a * s + b * c), dim=-1).reshape(n, heads, n_rot)
        return torch.cat((rot, x[..., n_rot:]), dim=-1).reshape(n, heads * D)

    def norm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g

    mask = torch.full((n, n), float("-inf"), dtype=torch.float64, device=dev).triu(1)
    x = T("token_embd.weight")[tokens]
    inputs = []
    for l in range(L):
        x = x.detach().requires_grad_(True) if l == 0 else x
        x.retain_grad()
        inputs.append(x)
        p = f"blk.{l}."
        h = norm(x, T(p + "attn_norm.weight"))
        q = rope(h @ T(p + "attn_q.weight").T, H).view(n, H, D).transpose(0, 1)
        k = rope(h @ T(p + "attn_k.weight").T, Hk).view(n, Hk, D).transpose(0, 1)
        v = (h @ T(p + "attn_v.weight").T).view(n, Hk, D).transpose(0, 1)
        k = k.repeat_interleave(H // Hk, dim=0)
        v = v.repeat_interleave(H // Hk, dim=0)
        att = torch.softmax(q @ k.transpose(1, 2) / D**0.5 + mask, dim=-1)
        o = (att @ v).transpose(0, 1).reshape(n, H * D)
        x = x + o @ T(p + "attn_output.weight").T
        h = norm(x, T(p + "ffn_norm.weight"))
        g = h @ T(p + "ffn_gate.weight").T
        u = h @ T(p + "ffn_up.weight").T
        x = x + (torch.nn.functional.silu(g) * u) @ T(p + "ffn_down.weight").T
    h = norm(x, T("output_norm.weight"))
    out = T("output.weight") if "output.weight" in w else T("token_embd.weight")
    targets = [(t - 1, hdr["tokens"][t]) for s, e2 in hdr["response"] for t in range(s, e2)]
    rows = torch.tensor([t for t, _ in targets], device=dev)
    ids = torch.tensor([i for _, i in targets], device=dev)
    logits = h[rows] @ out.T
    loss = torch.nn.functional.cross_entropy(logits, ids)
    loss.backward()

    print(f"loss: torch {loss.item():.6f}  moa {hdr['loss']:.6f}")
    errs = []
    for l in range(L):
        ref = inputs[l].grad.cpu().numpy()
        err = np.linalg.norm(moa[l] - ref) / max(np.linalg.norm(ref), 1e-30)
        errs.append(err)
        print(f"layer {l:3d}: relative error {err:.3e}")
    mean = float(np.mean(errs))
    print(f"mean relative error {mean:.3e} (tolerance {args.tol})")
    sys.exit(0 if mean <= args.tol and abs(loss.item() - hdr["loss"]) <= 1e-3 * max(1, loss.item()) else 1)


if __name__ == "__main__":
    main()
