#!/usr/bin/env python3
"""Reference (de)quantization through gguf-py, for ggml-compat's integration tests.

Usage:
    quants_ref.py --check            exit 0 when gguf and numpy import; print their versions
    quants_ref.py MANIFEST           run the jobs listed in MANIFEST

Each MANIFEST line is `OP TYPE NE0 INPUT OUTPUT`, fields separated by tabs:
    OP      quantize   (INPUT: little-endian f32, OUTPUT: ggml bytes)
            dequantize (INPUT: ggml bytes, OUTPUT: little-endian f32)
            roundtrip  (INPUT: little-endian f32, OUTPUT: little-endian f32, i.e.
                        dequantize(quantize(INPUT)), both by gguf-py)
    TYPE    a GGMLQuantizationType name (F16, BF16, Q4_0, Q4_K, ...)
    NE0     row length in elements (the data is shaped (-1, NE0), like a tensor's rows)
For each job one line is printed: `ok OP TYPE` or `unsupported OP TYPE: reason` (then no
OUTPUT is written). Any other failure raises and exits non-zero.
"""

import sys

import numpy as np


def run_job(op: str, type_name: str, ne0: int, src: str, dst: str) -> str:
    from gguf import GGMLQuantizationType, quants
    from gguf.constants import GGML_QUANT_SIZES

    qtype = GGMLQuantizationType[type_name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    try:
        if op == "quantize":
            data = np.fromfile(src, dtype="<f4").reshape((-1, ne0))
            out = quants.quantize(data, qtype)
        elif op == "dequantize":
            raw = np.fromfile(src, dtype=np.uint8)
            data = raw.reshape((-1, ne0 // block_size * type_size))
            out = quants.dequantize(data, qtype).astype("<f4", copy=False)
        elif op == "roundtrip":
            data = np.fromfile(src, dtype="<f4").reshape((-1, ne0))
            q = quants.quantize(data, qtype)
            out = quants.dequantize(q, qtype).astype("<f4", copy=False)
        else:
            raise ValueError(f"unknown op {op!r}")
    except NotImplementedError as e:
        return f"unsupported {op} {type_name}: {e}"
    np.ascontiguousarray(out).tofile(dst)
    return f"ok {op} {type_name}"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    if sys.argv[1] == "--check":
        import gguf  # noqa: F401

        try:
            from importlib.metadata import version

            gguf_version = version("gguf")
        except Exception:  # noqa: BLE001 - a version string is only informative
            gguf_version = "unknown"
        print(f"gguf {gguf_version} numpy {np.__version__}")
        return 0
    with open(sys.argv[1], encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            op, type_name, ne0, src, dst = line.split("\t")
            print(run_job(op, type_name, int(ne0), src, dst), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
