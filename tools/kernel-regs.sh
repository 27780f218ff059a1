#!/usr/bin/env bash
# Registers, spills and shared memory of every CUDA kernel, without a GPU: the kernel program
# (the cuda/ sources in src/backend/cuda/kernels.rs's order) compiled to PTX by NVRTC, then to
# machine code by ptxas from the nvidia-cuda-nvcc wheel, with `ptxas -v`. Occupancy follows from
# the register count: 65536 registers per multiprocessor / (threads per block x registers).
#
#   bash tools/kernel-regs.sh [REGEX] [ARCH]     # e.g. bash tools/kernel-regs.sh 'mmvq_q4_k|attn_dec' sm_90
#   MOA_CUBIN=/tmp/k.cubin bash tools/kernel-regs.sh ...  # also keeps the cubin (cuobjdump -sass)
#   MOA_NVRTC_DEFINES="NAME=1" bash tools/kernel-regs.sh ...  # a variant: macros the sources guard with #ifndef
#
# NVRTC and ptxas come from pip wheels into /tmp (MOA_NVRTC_DIR, MOA_NVCC_DIR) when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
pat=${1:-.}
arch=${2:-sm_90}
nvrtc=${MOA_NVRTC_DIR:-/tmp/nvrtc}
nvcc=${MOA_NVCC_DIR:-/tmp/nvcc}
if [ ! -e "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    pip install -q --target "$nvrtc" nvidia-cuda-nvrtc==13.0.88
fi
if [ ! -x "$nvcc/nvidia/cu13/bin/ptxas" ]; then
    tmp=$(mktemp -d)
    pip download -q --no-deps nvidia-cuda-nvcc==13.0.88 -d "$tmp"
    python3 -m zipfile -e "$tmp"/nvidia_cuda_nvcc-*.whl "$nvcc"
    chmod +x "$nvcc/nvidia/cu13/bin/ptxas"
    rm -rf "$tmp"
fi
LD_LIBRARY_PATH="$nvrtc/nvidia/cu13/lib" python3 - "$pat" "$arch" "$nvrtc" "$nvcc" <<'PY'
import ctypes, re, subprocess, sys, tempfile, os
pat, arch, nvrtc, nvcc = sys.argv[1:5]
# The sources in the order the backend concatenates them (SOURCES in kernels.rs).
files = re.findall(r'include_str!\("\.\./\.\./\.\./cuda/([^"]+)"\)',
                   open("src/backend/cuda/kernels.rs").read())
if not files:
    sys.exit("no cuda/ sources found in src/backend/cuda/kernels.rs")
src = "".join(f"// ---- {f}\n" + open(f"cuda/{f}").read() + "\n" for f in files)
lib = ctypes.CDLL(f"{nvrtc}/nvidia/cu13/lib/libnvrtc.so.13")
prog = ctypes.c_void_p()
if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"moa_kernels.cu", 0, None, None):
    sys.exit("nvrtcCreateProgram failed")
# FA_STAGES as the backend passes it (kernels.rs: fa_stages, 2 unless MOA_FA_STAGES).
opts = [f"--gpu-architecture=compute_{arch[3:]}".encode(), b"-std=c++17",
        ("-DFA_STAGES=" + os.environ.get("MOA_FA_STAGES", "2")).encode()]
# MOA_NVRTC_DEFINES as the backend passes it (kernels.rs: extra_defines).
opts += [f"-D{d}".encode() for d in re.split(r"[,\s]+", os.environ.get("MOA_NVRTC_DEFINES", ""))
         if re.fullmatch(r"[A-Za-z0-9_]+(=[A-Za-z0-9_=-]*)?", d)]
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
if rc:
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    sys.exit(log.value.decode())
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
with tempfile.TemporaryDirectory() as d:
    open(f"{d}/k.ptx", "wb").write(ptx.value)
    res = subprocess.run([f"{nvcc}/nvidia/cu13/bin/ptxas", f"-arch={arch}", "-v", f"{d}/k.ptx",
                          "-o", f"{d}/k.cubin"], capture_output=True, text=True)
    if res.returncode == 0 and os.environ.get("MOA_CUBIN"):
        # Kept for reading the machine code (cuobjdump -sass FILE).
        import shutil
        shutil.copy(f"{d}/k.cubin", os.environ["MOA_CUBIN"])
if res.returncode:
    sys.exit(res.stderr)
name, spill = None, {}
print(f"{'kernel':34s} {'regs':>5s} {'spill B':>8s} {'smem B':>7s}")
for line in res.stderr.splitlines():
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m:
        name = m.group(1)
        continue
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and name:
        spill[name] = m.group(1)
    m = re.search(r"Used (\d+) registers", line)
    if m and name and re.search(pat, name):
        sm = re.search(r"(\d+) bytes smem", line)
        smem = sm.group(1) if sm else "0"
        print(f"{name:34s} {m.group(1):>5s} {spill.get(name, '?'):>8s} {smem:>7s}")
PY
