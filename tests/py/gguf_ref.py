#!/usr/bin/env python3
"""Independent reference checks of moa's GGUF handling, using llama.cpp's gguf-py (PyPI `gguf`).

Subcommands (each exits non-zero with a message naming the first mismatch):
  check-inspect FILE --bin MOA_INSPECT   `moa-inspect FILE --json --full` equals GGUFReader's view
  check-tensors FILE --bin MOA_INSPECT   `moa-inspect --tensor` equals gguf.quants.dequantize, all tensors
  dump FILE                              GGUFReader's view as JSON (metadata, tensors, byte hashes)
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGMLQuantizationType
from gguf.quants import dequantize

SCALARS = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 1, GGUFValueType.INT16: 1,
    GGUFValueType.UINT32: 1, GGUFValueType.INT32: 1, GGUFValueType.FLOAT32: 1, GGUFValueType.UINT64: 1,
    GGUFValueType.INT64: 1, GGUFValueType.FLOAT64: 1, GGUFValueType.BOOL: 1,
}


def decode(parts, i, vtype):
    """Decodes one value of type vtype from gguf-py's flat `parts` list starting at index i.
    Returns (value, element_type_or_None, next_index). Handles arrays nested to any depth,
    which ReaderField.contents() flattens."""
    if vtype == GGUFValueType.STRING:
        return bytes(parts[i + 1]).decode("utf-8", errors="replace"), None, i + 2
    if vtype == GGUFValueType.ARRAY:
        itype = GGUFValueType(int(parts[i][0]))
        n = int(parts[i + 1][0])
        i += 2
        items = []
        for _ in range(n):
            v, _, i = decode(parts, i, itype)
            items.append(v)
        return items, itype, i
    v = parts[i].tolist()[0]
    if isinstance(v, float) and not math.isfinite(v):
        v = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v, None, i + 1


def reader_view(path):
    r = GGUFReader(path)
    meta = []
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue  # gguf-py's pseudo-fields for the header
        vtype = field.types[0]
        value, etype, end = decode(field.parts, 3, vtype)
        assert end == len(field.parts), f"{name}: decoded {end} of {len(field.parts)} parts"
        entry = {"key": name, "type": vtype.name, "value": value}
        if etype is not None:
            entry["element_type"] = etype.name
            entry["len"] = len(value)
        meta.append(entry)
    tensors = []
    for t in r.tensors:
        tensors.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],
            "n_elements": int(t.n_elements),
            "data_offset": int(t.data_offset),
            "offset": int(t.data_offset - r.data_offset),
            "n_bytes": int(t.n_bytes),
        })
    version = int(r.fields["GGUF.version"].parts[0][0])
    return r, {"version": version, "alignment": int(r.alignment), "data_offset": int(r.data_offset),
               "metadata": meta, "tensors": tensors}


def fail(msg):
    print(f"MISMATCH: {msg}")
    sys.exit(1)


def check_inspect(path, exe):
    _, ref = reader_view(path)
    out = subprocess.run([exe, path, "--json", "--full"], check=True, capture_output=True).stdout
    ours = json.loads(out)
    for k in ("version", "alignment", "data_offset"):
        if ours[k] != ref[k]:
            fail(f"{k}: moa {ours[k]} vs gguf-py {ref[k]}")
    if len(ours["metadata"]) != len(ref["metadata"]):
        fail(f"metadata count: moa {len(ours['metadata'])} vs gguf-py {len(ref['metadata'])}")
    for a, b in zip(ours["metadata"], ref["metadata"]):
        for k in ("key", "type", "value", "element_type", "len"):
            if a.get(k) != b.get(k):
                av, bv = repr(a.get(k)), repr(b.get(k))
                fail(f"metadata {b['key']!r} field {k}: moa {av[:200]} vs gguf-py {bv[:200]}")
    if len(ours["tensors"]) != len(ref["tensors"]):
        fail(f"tensor count: moa {len(ours['tensors'])} vs gguf-py {len(ref['tensors'])}")
    for a, b in zip(ours["tensors"], ref["tensors"]):
        for k in b:
            if a[k] != b[k]:
                fail(f"tensor {b['name']!r} field {k}: moa {a[k]} vs gguf-py {b[k]}")
    print(f"ok: {len(ref['metadata'])} keys and {len(ref['tensors'])} tensors agree with gguf-py")


def check_tensors(path, exe, only=None):
    r = GGUFReader(path)
    worst = 0.0
    counts = {}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "t.f32")
        for t in r.tensors:
            if only and t.name not in only:
                continue
            subprocess.run([exe, path, "--tensor", t.name, "--out", out], check=True, capture_output=True)
            ours = np.fromfile(out, dtype="<f4")
            ref = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
            if ours.shape != ref.shape:
                fail(f"{t.name}: {ours.shape[0]} values from moa vs {ref.shape[0]} from gguf-py")
            exact = t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
            if exact:
                if not np.array_equal(ours.view(np.uint32), ref.view(np.uint32)):
                    i = int(np.argmax(ours.view(np.uint32) != ref.view(np.uint32)))
                    fail(f"{t.name} ({t.tensor_type.name}): not bit-identical at element {i}: {ours[i]} vs {ref[i]}")
            else:
                scale = np.maximum(np.abs(ref), np.float32(1e-30))
                rel = np.abs(ours.astype(np.float64) - ref) / scale
                # Elements that are exactly zero in the reference must be (near) zero in ours.
                bad = rel > 1e-6
                if bad.any():
                    i = int(np.argmax(bad))
                    fail(f"{t.name} ({t.tensor_type.name}): element {i}: moa {ours[i]} vs gguf-py {ref[i]} (rel {rel[i]:.3g})")
                worst = max(worst, float(rel.max()) if rel.size else 0.0)
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    print(f"ok: {sum(counts.values())} tensors {counts} match gguf-py dequantization (max rel err {worst:.3g})")


def dump(path):
    r, view = reader_view(path)
    for t, tv in zip(r.tensors, view["tensors"]):
        tv["sha256"] = hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).tobytes()).hexdigest()
    json.dump(view, sys.stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["check-inspect", "check-tensors", "dump"])
    p.add_argument("file")
    p.add_argument("--bin")
    p.add_argument("--only", nargs="*")
    a = p.parse_args()
    if a.cmd == "check-inspect":
        check_inspect(a.file, a.bin)
    elif a.cmd == "check-tensors":
        check_tensors(a.file, a.bin, a.only)
    else:
        dump(a.file)


if __name__ == "__main__":
    main()
