#!/usr/bin/env python3
"""Reference Q8_0 quantization through gguf-py, for ggml-compat's bit-exactness test.

Reads little-endian f32 values from stdin (a multiple of 32 of them), quantizes them with
`gguf.quants.quantize(x, GGMLQuantizationType.Q8_0)` and writes the resulting block bytes to
stdout. Used by ggml-compat/tests/q8.rs; exits 3 when gguf or numpy is missing.
"""
import sys

try:
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
except ImportError as e:  # pragma: no cover
    print(f"q8_ref.py: {e}", file=sys.stderr)
    sys.exit(3)


def main() -> None:
    data = np.frombuffer(sys.stdin.buffer.read(), dtype="<f4")
    if data.size % 32 != 0:
        sys.exit(f"q8_ref.py: {data.size} values is not a multiple of 32")
    # One row per 32-element block is valid and keeps every block independent.
    rows = data.astype(np.float32).reshape(-1, 32)
    with np.errstate(all="ignore"):
        out = quantize(rows, GGMLQuantizationType.Q8_0)
    sys.stdout.buffer.write(np.ascontiguousarray(out).tobytes())


if __name__ == "__main__":
    main()
