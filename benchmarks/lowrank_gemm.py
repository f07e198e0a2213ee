"""Low-rank pair vs the dense layer it replaces, one layer at a time (issue 22, item 5): is the pair's time what
two GEMMs at its FLOPs predict, or is there room for a fused kernel (docs/kernels.md, "Low-rank pairs")?

For each layer shape (ViT-S MLP and attention projections, ResNet-50 and MobileNetV3 1x1 convs as GEMMs over
their pixels) and a few ranks ``k`` (fractions of the FLOP break-even rank ``Cin*Cout/(Cin+Cout)``), the dense
``nn.Linear`` and the ``LowRankLinear`` pair are timed side by side in interleaved rounds
(``dsrewrite.timing.measure.compare``: fastest of each, noise = half the IQR of the per-round ratios). The FLOP ratio is
the cost model's (``dsrewrite.plan.cost_model``). On CUDA the rows also give each variant's achieved bandwidth from the bytes
it must move at least (activations in and out, weights, the pair's intermediate twice).

    python benchmarks/lowrank_gemm.py --device cpu --out benchmarks/lowrank_gemm_cpu.json
    python benchmarks/lowrank_gemm.py --device cuda --dtype fp16 --out $OUT/lowrank_gemm.json   # gpu_check.sh step 6
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _meta import write_json  # noqa: E402

from dsrewrite.plan import cost_model as cost  # noqa: E402
from dsrewrite.plan.factorize import factorize_layer  # noqa: E402
from dsrewrite.ir import ConvSpec  # noqa: E402
from dsrewrite.timing.measure import compare  # noqa: E402
from dsrewrite.modules import LowRankLinear  # noqa: E402

# (name, rows per batch item, Cin, Cout): rows are tokens (ViT-S at 224: 197) or pixels of a 1x1 conv
LAYERS = [
    ("vit_s.mlp.fc1", 197, 384, 1536),
    ("vit_s.mlp.fc2", 197, 1536, 384),
    ("vit_s.attn.qkv", 197, 384, 1152),
    ("resnet50.layer3.conv3", 14 * 14, 256, 1024),
    ("resnet50.layer1.conv1", 56 * 56, 64, 64),
    ("mobilenetv3.blocks.3.conv_pw", 28 * 28, 40, 120),
]
FRACTIONS = (0.25, 0.5)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run(device: str, dtype: torch.dtype, batch: int, layers=LAYERS, fractions=FRACTIONS) -> List[dict]:
    rows_out = []
    size = torch.tensor([], dtype=dtype).element_size()
    for name, rows, cin, cout in layers:
        m = batch * rows
        dense = nn.Linear(cin, cout).to(device=device, dtype=dtype).eval()
        x = torch.randn(m, cin, device=device, dtype=dtype)
        spec = ConvSpec(name, cin, cout, (), stride=(), dilation=(), bias=True, pixels=m)
        for frac in fractions:
            k = max(1, int(frac * cost.breakeven_rank(spec)))
            pair = LowRankLinear.from_factors(factorize_layer(dense.weight.float(), k, dense.bias.float(), lowrank=True))
            pair = pair.to(device=device, dtype=dtype).eval()
            with torch.no_grad():
                c = compare(dense, pair, (x,), device=torch.device(device), reps=25, max_seconds=4.0)
            row = dict(layer=name, rows=m, cin=cin, cout=cout, rank=k, fraction_of_breakeven=frac,
                       flops_ratio=cost.separable_flops(spec, k) / cost.dense_flops(spec),
                       dense_ms=c.before_ms, pair_ms=c.after_ms, time_ratio=c.after_ms / c.before_ms,
                       noise=c.noise, rounds=c.rounds)
            if device == "cuda":  # the least each must move, over the time it took
                dense_bytes = size * (m * (cin + cout) + cin * cout)
                pair_bytes = size * (m * (cin + cout + 2 * k) + k * (cin + cout))
                row["dense_GBps"] = dense_bytes / c.before_ms / 1e6
                row["pair_GBps"] = pair_bytes / c.after_ms / 1e6
                row["intermediate_share_of_pair_bytes"] = 2 * m * k * size / pair_bytes
            rows_out.append(row)
    return rows_out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    p.add_argument("--out", help="JSON output")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype or ("fp16" if a.device == "cuda" else "fp32")]
    rows = run(a.device, dtype, a.batch)
    for r in rows:
        print(f"{r['layer']:30s} {r['rows']:6d}x{r['cin']:4d}->{r['cout']:4d} k={r['rank']:4d}  FLOPs {r['flops_ratio']:.2f}x"
              f"  time {r['time_ratio']:.2f}x (+-{r['noise']:.2f}; dense {r['dense_ms']:.3f} ms)")
    if a.out:
        dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
        write_json(a.out, "lowrank_gemm.py", argv if argv is not None else sys.argv[1:], device=dev,
                   dtype=str(dtype), batch=a.batch, threads=a.threads, load=os.getloadavg(), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
