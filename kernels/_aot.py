"""Ahead-of-time compilation of the kernels for an NVIDIA target, on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) checks the arithmetic but not what the GPU compiler accepts:
layouts, ``tl.dot`` operand types, shared-memory use of a config. This runs Triton's real pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with ptxas) for a given architecture, so a kernel or autotune
config that would fail to compile or launch on an A100/H100 fails here first.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import interpreting

__all__ = ["CompiledInfo", "compile_for", "compile_many", "SHARED_LIMIT", "DTYPES"]

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


def _mma_kind(ptx: str) -> str:
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync\.", ptx):
        return "mma"
    return "fma"


def compile_for(kernel, constexprs: Dict[str, object], *, dtype: str = "fp16", arch: int = 90,
                num_warps: int = 4, num_stages: int = 3, int_type: str = "i32",
                pointer_dtypes: Optional[Dict[str, str]] = None, ones: Iterable[str] = ()) -> CompiledInfo:
    """Compile ``kernel`` (a ``@triton.jit`` function or its autotuned wrapper) for ``sm_<arch>``.

    Pointer arguments (names ending in ``_ptr``) point to ``dtype`` unless ``pointer_dtypes`` says otherwise
    and are 16-byte aligned (as torch allocations are); other non-constexpr arguments are ``int_type``
    scalars, except those named in ``ones``: like the JIT at run time, these are specialised to the constant 1
    (unit strides tell the compiler which dimension is contiguous, which decides vector loads and pipelining).
    """
    fn = kernel
    while not hasattr(fn, "params"):  # autotuner / heuristics wrappers hold the JITFunction in .fn
        fn = fn.fn
    pointer_dtypes = pointer_dtypes or {}
    ones = set(ones)
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
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{fn.__name__}: no cubin produced for sm_{arch}")
    return CompiledInfo(arch=arch, shared_bytes=int(compiled.metadata.shared), mma=_mma_kind(ptx),
                        ptx_lines=ptx.count("\n"), fits=int(compiled.metadata.shared) <= SHARED_LIMIT[arch])


_KERNELS = {
    "fused": ("dsrewrite.kernels.separable_conv2d", "_separable_conv2d_kernel"),
    "depthwise": ("dsrewrite.kernels.depthwise", "_depthwise_conv2d_kernel"),
    "pointwise": ("dsrewrite.kernels.pointwise", "_pointwise_conv2d_kernel"),
}


def _compile_case(case: dict) -> dict:
    import importlib

    mod, name = _KERNELS[case["kernel"]]
    kernel = getattr(importlib.import_module(mod), name)
    kw = {k: case[k] for k in ("dtype", "arch", "num_warps", "num_stages", "ones", "pointer_dtypes") if k in case}
    return asdict(compile_for(kernel, case["constexprs"], **kw))


def compile_many(cases: List[dict]) -> List[dict]:
    """Compile each case (``{"kernel": "fused"|"depthwise"|"pointwise", "constexprs": {...}, "dtype", "arch",
    "num_warps", "num_stages", "ones", "pointer_dtypes"}``) and return :class:`CompiledInfo` fields as dicts. Under
    ``TRITON_INTERPRET=1`` the kernels are interpreter objects, so the compiles run in a child process
    without it."""
    if not interpreting():
        return [_compile_case(c) for c in cases]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dsrewrite.kernels._aot"], input=json.dumps(cases), env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # child process of compile_many: cases as JSON on stdin, results as one JSON line
    print(json.dumps([_compile_case(c) for c in json.loads(sys.stdin.read())]))
