"""Behaviour guard for refactors (issue 24): plans, report numbers and output digests on a fixed set of models
and options, every route, nothing timed. Run before and after a change and compare the JSON files:

    python benchmarks/layout_guard.py --json /tmp/before.json
    python benchmarks/layout_guard.py --json /tmp/after.json --compare /tmp/before.json

Everything here is deterministic on one machine (fixed seeds, no timing), so "identical" means equal JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the module-swap route rewrites it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if y.sum() > 0:
            y = self.b(y)
        return self.fc(y.mean((2, 3)))


def _models() -> List[Tuple[str, Callable[[], nn.Module], Tuple[int, ...]]]:
    import torchvision

    return [("resnet18", lambda: torchvision.models.resnet18(weights=None), (1, 3, 64, 64)),
            ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(weights=None), (1, 3, 64, 64)),
            ("untraceable", _Untraceable, (2, 3, 16, 16))]


OPTIONS: List[Dict[str, Any]] = [
    dict(rank=2), dict(rank="full"), dict(target_flops=0.5), dict(target_flops=0.5, kinds="all"),
    dict(target_params=0.6, ragged=True), dict(energy=0.9), dict(rank={"layer4.*": 1, "layer1.*": 2}),
    dict(target_flops=0.6, kinds="all", calibration="random"),
]


def _layers(report) -> List[list]:
    return [[L.name, L.kind, L.origin, L.rewritten, L.rank, L.channel_ranks, L.params_after, L.flops_after,
             None if L.error is None else round(float(L.error), 6), L.calib_error_after, L.reason, L.note,
             L.policy] for L in report.layers]


def torch_rows() -> Dict[str, Any]:
    import dsrewrite

    out: Dict[str, Any] = {}
    for name, make, shape in _models():
        for opts in OPTIONS:
            torch.manual_seed(0)
            model = make().eval()
            x = torch.randn(*shape)
            kw = dict(opts)
            if kw.get("calibration") == "random":
                kw["calibration"] = [torch.randn(*shape) for _ in range(2)]
            key = f"torch/{name}/{json.dumps(opts, sort_keys=True)}"
            try:
                res = dsrewrite.rewrite(model, x, measure_time=False, **kw)
            except Exception as e:  # noqa: BLE001 - a refusal is an outcome too
                out[key] = dict(refused=str(e).splitlines()[0])
                continue
            with torch.no_grad():
                y = res.model(x)
            out[key] = dict(layers=_layers(res.report), params=[res.report.params_before, res.report.params_after],
                            flops=[res.report.flops_before, res.report.flops_after], notes=res.report.notes,
                            output=_digest(y), plan=res.plan.to_dict()["layers"])
    return out


def onnx_rows() -> Dict[str, Any]:
    import torchvision

    import dsrewrite.onnx as ds_onnx

    out: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "m.onnx")
        torch.manual_seed(0)
        m = torchvision.models.resnet18(weights=None).eval()
        torch.onnx.export(m, (torch.randn(1, 3, 64, 64),), src, input_names=["x"], dynamo=False)
        for opts in OPTIONS[:6]:
            key = f"onnx/resnet18/{json.dumps(opts, sort_keys=True)}"
            try:
                model, rep = ds_onnx.rewrite(src, None, **opts)
            except Exception as e:  # noqa: BLE001
                out[key] = dict(refused=str(e).splitlines()[0])
                continue
            out[key] = dict(layers=_layers(rep), params=[rep.params_before, rep.params_after],
                            flops=[rep.flops_before, rep.flops_after], notes=rep.notes,
                            model=hashlib.sha256(model.SerializeToString()).hexdigest()[:16])
    return out


def compile_rows() -> Dict[str, Any]:
    import dsrewrite

    out: Dict[str, Any] = {}
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    torch._dynamo.reset()
    c = dsrewrite.compile(m, rank=2)
    with torch.no_grad():
        c(x)
    from dsrewrite.dynamo.backend import last_report

    rep = last_report()
    out["compile/seq/rank2"] = dict(layers=_layers(rep))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--compare")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = {**torch_rows(), **onnx_rows(), **compile_rows()}
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1, sort_keys=True, default=str)
    print(f"{len(rows)} cases -> {a.json}")
    if a.compare:
        with open(a.compare) as f:
            before = json.load(f)
        now = json.loads(json.dumps(rows, sort_keys=True, default=str))
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        for k in diff:
            print("DIFFERS:", k)
        print(f"{len(diff)} of {len(now)} cases differ")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
