"""Ahead-of-time compilation of the kernels for an NVIDIA target, on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) checks the arithmetic but not what the GPU compiler accepts:
layouts, ``tl.dot`` operand types, shared-memory use of a config. This runs Triton's real pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with ptxas) for a given architecture, so a kernel or autotune
config that would fail to compile or launch on an A100/H100 fails here first.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .env import interpreting

__all__ = ["CompiledInfo", "compile_for", "compile_case", "compile_many", "sass_loop_counts", "fused_case", "dw_fma_ratio",
           "FUSED_LAYOUTS", "SHARED_LIMIT", "DTYPES"]

# largest dynamic shared memory per block (bytes) by compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# torch dtype name -> Triton pointer element type
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "i64": "i64"}


@dataclass
class CompiledInfo:
    """What the compiler made of one (kernel, config, dtype, arch)."""

    arch: int
    shared_bytes: int
    mma: str  # "wgmma" (Hopper async tensor cores), "mma" (mma.sync tensor cores), "fma" (no tensor cores)
    ptx_lines: int
    fits: bool  # shared memory within the architecture's per-block limit
    registers: int = -1  # per thread, from the cubin (cuobjdump -res-usage); -1 when the tool is missing
    spill_bytes: int = -1  # local memory per thread (register spills)
    loop: Optional[Dict[str, int]] = None  # SASS instruction counts in the main loop (sass_loop_counts)


def _mma_kind(ptx: str) -> str:
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync\.", ptx):
        return "mma"
    return "fma"


_LOAD = re.compile(r"^(LDG|LDGSTS)(\.[A-Z0-9_]+)*$")
_WIDTH = re.compile(r"\.(128|64|U16|S16|16|U8|S8)\b")


def _width_bits(op: str) -> int:
    m = _WIDTH.search(op)
    if not m:
        return 32
    w = m.group(1)
    return {"U16": 16, "S16": 16, "16": 16, "U8": 8, "S8": 8}.get(w, None) or int(w)


def sass_loop_counts(sass: str, element_bits: int) -> Dict[str, int]:
    """Instruction counts in the main loop of a kernel's SASS (the longest backward branch): global loads
    wider than one element (``loads_vector``) or not (``loads_scalar``; ``LDGSTS`` is ``cp.async``, counted in
    both by width and in ``cp_async``), global stores, FP32 FMAs/multiplies (``ffma``) and tensor-core
    instructions (``mma``). Per thread and loop iteration, as the hardware issues them."""
    lines = []
    for ln in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", ln)
        if m:
            lines.append((int(m.group(1), 16), m.group(3), m.group(4)))
    start, end = 0, -1
    for addr, op, rest in lines:
        t = re.match(r"\s*0x([0-9a-f]+)", rest)
        if op == "BRA" and t and int(t.group(1), 16) < addr and addr - int(t.group(1), 16) > end - start:
            start, end = int(t.group(1), 16), addr
    c = dict(loads_vector=0, loads_scalar=0, cp_async=0, stores=0, ffma=0, mma=0, instructions=0)
    for addr, op, _ in lines:
        if not start <= addr <= end:
            continue
        c["instructions"] += 1
        if _LOAD.match(op):
            c["loads_vector" if _width_bits(op) > element_bits else "loads_scalar"] += 1
            c["cp_async"] += op.startswith("LDGSTS")
        elif op.startswith("STG"):
            c["stores"] += 1
        elif op.startswith(("FFMA", "FMUL")) and not op.startswith("FFMA2"):
            c["ffma"] += 1
        elif op.startswith(("HGMMA", "HMMA")):
            c["mma"] += 1
    c["loop_found"] = int(end > start)
    if not c["loop_found"]:  # no loop (e.g. a kernel with only unrolled taps): nothing to count
        c = {k: None for k in c} | {"loop_found": 0}
    return c


def _cubin_tools(cubin: bytes, element_bits: int) -> dict:
    """Registers, spills and loop counts from the cubin with the cuobjdump Triton ships (empty when missing)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    return dict(registers=int(reg.group(1)) if reg else -1, spill_bytes=int(local.group(1)) if local else -1,
                loop=sass_loop_counts(sass, element_bits) if sass else None)


_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "i64": 64}


def compile_for(kernel, constexprs: Dict[str, object], *, dtype: str = "fp16", arch: int = 90,
                num_warps: int = 4, num_stages: int = 3, int_type: str = "i32",
                pointer_dtypes: Optional[Dict[str, str]] = None, ones: Iterable[str] = (),
                divisible: Iterable[str] = ()) -> CompiledInfo:
    """Compile ``kernel`` (a ``@triton.jit`` function or its autotuned wrapper) for ``sm_<arch>``.

    Pointer arguments (names ending in ``_ptr``) point to ``dtype`` unless ``pointer_dtypes`` says otherwise
    and are 16-byte aligned (as torch allocations are); other non-constexpr arguments are ``int_type``
    scalars, except those named in ``ones``: like the JIT at run time, these are specialised to the constant 1
    (unit strides tell the compiler which dimension is contiguous, which decides vector loads and pipelining),
    and those named in ``divisible``, marked multiples of 16 as the JIT marks such values (channel counts and
    strides of real layers: this decides whether a vector load is aligned).
    """
    fn = kernel
    while not hasattr(fn, "params"):  # autotuner / heuristics wrappers hold the JITFunction in .fn
        fn = fn.fn
    pointer_dtypes = pointer_dtypes or {}
    ones, divisible = set(ones), set(divisible)
    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name in ones:
            signature[p.name] = "constexpr"
            consts[(i,)] = 1
        elif p.is_constexpr:
            if p.name not in constexprs:
                raise KeyError(f"constexpr {p.name!r} of {fn.__name__} not given")
            signature[p.name] = "constexpr"
            consts[(i,)] = constexprs[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*" + DTYPES[pointer_dtypes.get(p.name, dtype)]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = int_type
            if p.name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{fn.__name__}: no cubin produced for sm_{arch}")
    return CompiledInfo(arch=arch, shared_bytes=int(compiled.metadata.shared), mma=_mma_kind(ptx),
                        ptx_lines=ptx.count("\n"), fits=int(compiled.metadata.shared) <= SHARED_LIMIT[arch],
                        **_cubin_tools(compiled.asm["cubin"], _BITS[dtype]))


_KERNELS = {
    "fused": ("dsrewrite.kernels.separable_conv2d", "_separable_conv2d_kernel"),
    "depthwise": ("dsrewrite.kernels.depthwise", "_depthwise_conv2d_kernel"),
    "pointwise": ("dsrewrite.kernels.pointwise", "_pointwise_conv2d_kernel"),
    "bwd_fused": ("dsrewrite.kernels.separable_backward", "_separable_bwd_fused_kernel"),
    "bwd_input": ("dsrewrite.kernels.separable_backward", "_separable_bwd_input_kernel"),
}

# How the fused kernel is specialised for a call in each memory format, as the JIT does it: unit strides become
# constants, channel counts and the other strides of real layers are multiples of 16. An NCHW call reads a
# channels_last copy of its input when a channel vector is >= 16 bytes (``nchw_input_copy``) and writes NCHW;
# "nchw_direct" is the route of narrower inputs (reads NCHW as it is).
FUSED_LAYOUTS = {
    "channels_last": dict(ones=["sxc", "sym"], divisible=["C", "CK", "M", "sxn", "sxh", "sxw", "syn", "syh", "syw"]),
    "nchw": dict(ones=["sxc", "syw"], divisible=["C", "CK", "M", "sxn", "sxh", "sxw", "syn"]),
    "nchw_direct": dict(ones=["sxw", "syw"], divisible=["C", "CK", "M", "sxn", "sxc", "syn"]),
}
UNIT_CONV = ["stride_h", "stride_w", "dil_h", "dil_w"]  # stride 1, dilation 1: specialised to constants


def fused_case(cfg, dtype: str, arch: int, layout: str = "channels_last", k: int = 3, rank: int = 1,
               ragged: bool = False, precision: str = "tf32", act: int = 0) -> dict:
    """A :func:`compile_many` case of the fused forward kernel as the runtime launches it on ``sm_<arch>``."""
    spec = FUSED_LAYOUTS[layout]
    consts = dict(KH=k, KW=k, R=1 if ragged else rank, HAS_BIAS=True, ACT=act, PRECISION=precision,
                  HAS_INDEX=ragged, DW_BARRIER=True, **cfg.kwargs)
    return dict(kernel="fused", constexprs=consts, dtype=dtype, arch=arch, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, ones=spec["ones"] + UNIT_CONV, divisible=spec["divisible"],
                pointer_dtypes={"idx_ptr": "i64"})


def dw_fma_ratio(case: dict, info: dict) -> Optional[float]:
    """Depthwise FP32 FMAs the compiled main loop executes per thread, over the number one channel block needs
    (``KH*KW*R*TILE_H*TILE_W*BLOCK_C`` / threads): 1.0 when nothing is computed twice. When ``tl.dot`` itself
    became FMAs (fp32 ieee), its ``TILE*BLOCK_M*BLOCK_C*R`` are subtracted first."""
    loop = info.get("loop")
    if not loop or not loop.get("loop_found"):
        return None
    c = case["constexprs"]
    threads = 32 * case["num_warps"]
    p = c["TILE_H"] * c["TILE_W"]
    needed = c["KH"] * c["KW"] * c["R"] * p * c["BLOCK_C"] / threads
    dot = p * c["BLOCK_M"] * c["BLOCK_C"] * c["R"] / threads if info.get("mma") == "fma" else 0
    return round((loop["ffma"] - dot) / needed, 3)


def compile_case(case: dict) -> dict:
    """Compile one :func:`compile_many` case; the kernel is looked up by module and name (the module is imported
    here: any ``module:name`` may be given, e.g. a benchmark's variant)."""
    mod, name = _KERNELS[case["kernel"]] if case["kernel"] in _KERNELS else case["kernel"].split(":")
    kernel = getattr(importlib.import_module(mod), name)
    kw = {k: case[k] for k in ("dtype", "arch", "num_warps", "num_stages", "ones", "pointer_dtypes", "divisible")
          if k in case}
    return asdict(compile_for(kernel, case["constexprs"], **kw))


def compile_many(cases: List[dict]) -> List[dict]:
    """Compile each case (``{"kernel": "fused"|"depthwise"|"pointwise"|"bwd_fused"|"bwd_input"|"module:name",
    "constexprs": {...}, "dtype", "arch",
    "num_warps", "num_stages", "ones", "pointer_dtypes", "divisible"}``) and return :class:`CompiledInfo` fields as dicts. Under
    ``TRITON_INTERPRET=1`` the kernels are interpreter objects, so the compiles run in a child process
    without it."""
    if not interpreting():
        return [compile_case(c) for c in cases]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dsrewrite.kernels.aot"], input=json.dumps(cases), env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # child process of compile_many: cases as JSON on stdin, results as one JSON line
    print(json.dumps([compile_case(c) for c in json.loads(sys.stdin.read())]))
