#!/usr/bin/env python3
"""Independent check of a `moa-bench synth` file with llama.cpp's gguf-py (PyPI `gguf`).

usage: synth_check.py FILE --type q4_k_m|q4_0|q8_0|q4_k [--tied] [--llama3-rope]

Reads the hyperparameters from the file and re-derives, from llama.cpp's quantization rules
(llama_tensor_get_type, b11434), the tensor list, shapes and types the file must have; checks the
vocabulary (sizes, merges join existing tokens, bos/eos are control tokens) and that sampled rows
of every tensor dequantize to finite values. Exits non-zero naming the first mismatch.
"""
import argparse
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize


def fail(msg):
    print("MISMATCH:", msg)
    sys.exit(1)


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        fail(f"missing key {key}")
    return f.contents()


def block(t):
    return GGML_QUANT_SIZES[t][0]


def fallback(t, ncols):
    if ncols % block(t) == 0:
        return t
    t2 = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(t, t)
    return t2 if ncols % block(t2) == 0 else T.F16


def expected_type(mix, name, layer, ncols, n_layer, n_head, n_head_kv, tied):
    base = {"q4_k_m": T.Q4_K, "q4_k": T.Q4_K, "q4_0": T.Q4_0, "q8_0": T.Q8_0}[mix]
    if name.endswith("norm.weight") or name == "rope_freqs.weight":
        return T.F32

    def more_bits(i):
        return i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2

    def output():
        if ncols % block(base) != 0:
            return T.Q8_0
        return T.Q6_K if base != T.Q8_0 else T.Q8_0

    if name == "output.weight" or (name == "token_embd.weight" and tied):
        t = output()
    elif mix == "q4_k_m" and name.endswith("attn_v.weight"):
        is_70b = n_layer == 80 and n_head != n_head_kv
        t = T.Q6_K if more_bits(layer) else (T.Q5_K if is_70b else base)
    elif mix == "q4_k_m" and name.endswith("ffn_down.weight") and more_bits(layer):
        t = T.Q6_K
    else:
        t = base
    return fallback(t, ncols)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--type", required=True)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--llama3-rope", action="store_true")
    a = ap.parse_args()
    r = GGUFReader(a.file)
    if field(r, "general.architecture") != "llama":
        fail("architecture is not llama")
    n_layer = field(r, "llama.block_count")
    e = field(r, "llama.embedding_length")
    n_head = field(r, "llama.attention.head_count")
    n_kv = field(r, "llama.attention.head_count_kv")
    ff = field(r, "llama.feed_forward_length")
    v = field(r, "llama.vocab_size")
    hd = e // n_head
    kv = n_kv * hd
    want = []
    if a.llama3_rope:
        want.append(("rope_freqs.weight", 0, [hd // 2]))
    want.append(("token_embd.weight", 0, [e, v]))
    for i in range(n_layer):
        for n, shape in [("attn_norm", [e]), ("attn_q", [e, e]), ("attn_k", [e, kv]),
                         ("attn_v", [e, kv]), ("attn_output", [e, e]), ("ffn_norm", [e]),
                         ("ffn_gate", [e, ff]), ("ffn_up", [e, ff]), ("ffn_down", [ff, e])]:
            want.append((f"blk.{i}.{n}.weight", i, shape))
    want.append(("output_norm.weight", 0, [e]))
    if not a.tied:
        want.append(("output.weight", 0, [e, v]))
    got = {t.name: t for t in r.tensors}
    if sorted(got) != sorted(w[0] for w in want):
        fail(f"tensor names differ: extra {sorted(set(got) - set(w[0] for w in want))[:5]}, "
             f"missing {sorted(set(w[0] for w in want) - set(got))[:5]}")
    counts = {}
    for name, layer, shape in want:
        t = got[name]
        if [int(x) for x in t.shape] != shape:
            fail(f"{name}: shape {list(t.shape)}, expected {shape}")
        et = expected_type(a.type, name, layer, shape[0], n_layer, n_head, n_kv, a.tied)
        if t.tensor_type != et:
            fail(f"{name}: type {t.tensor_type.name}, expected {et.name}")
        counts[et.name] = counts.get(et.name, 0) + 1
        # a few rows (first, middle, last) must dequantize to finite values
        data = t.data
        rows = data if data.ndim > 1 else data.reshape(1, -1)
        for ri in sorted({0, rows.shape[0] // 2, rows.shape[0] - 1}):
            x = dequantize(np.asarray(rows[ri]), t.tensor_type)
            if not np.all(np.isfinite(x)):
                fail(f"{name}: row {ri} has non-finite values")
            if name.endswith("norm.weight") is False and name != "rope_freqs.weight":
                if not (0 < float(np.std(x)) < 1.0):
                    fail(f"{name}: row {ri} sd {np.std(x)}")
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    if len(tokens) != v or len(types) != v:
        fail(f"{len(tokens)} tokens / {len(types)} types, vocab_size {v}")
    if len(set(tokens)) != v:
        fail("duplicate token strings")
    vocab = set(tokens)
    for m in merges:
        left, right = m.split(" ")
        if left not in vocab or right not in vocab or left + right not in vocab:
            fail(f"merge {m!r} does not join two tokens into a token")
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]:
        i = field(r, key)
        if not (0 <= i < v) or types[i] != 3:
            fail(f"{key} = {i} is not a control token")
    print("ok", a.type, n_layer, "layers", counts, len(merges), "merges")


if __name__ == "__main__":
    main()
