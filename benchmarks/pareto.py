"""Pareto benchmark (issues 14 and 22): dsrewrite, over KxK convs only and over every weight layer, against L1
channel pruning, metric vs measured CPU latency.

Three models, each as the original (the teacher) and as compressed variants:

- the digits CNN of ``dsrewrite demo`` (:mod:`dsrewrite.demo`, trained here with a fixed seed), timed on the
  whole test set (360 images of 8x8, as ``run_digits`` plans it); metric: test accuracy;
- facenet-pytorch's MTCNN ONet with its real weights (loaded from the wheel, not installed), timed on a batch
  of 256 crops of 48x48 (it runs on batches of face candidates); metrics: box / landmark / face-probability
  relative error against the original and face-decision agreement (box error is the plotted one);
- a small 1x1-heavy network trained here on the digits (:class:`DigitsMBNet`: a 3x3 stem, then inverted-residual
  blocks -- 1x1 expand, 3x3 depthwise, 1x1 project -- and a 1x1 head: most of its multiply-adds are in 1x1 convs),
  timed and scored like the digits CNN.

Methods, each followed by the same short distillation from the original (``dsrewrite.finetune.fit``, every parameter
trained, output terms only: labels + KD on the digits and DigitsMBNet, an output-matching loss on unlabeled crops for
ONet):

- dsrewrite: ``rewrite(model, x, target_latency=t, kinds=k, calibration=...)`` for a sweep of ``t`` (a refused
  target is recorded with its message), once per ``k`` in ``--kinds``: ``kxk`` (separable pairs for KxK convs
  only, the curve of issue 14) and ``all`` (also low-rank pairs for 1x1 convs and linear layers, one budget over
  all of them; issue 22). Each is its own curve ("dsrewrite kxk", "dsrewrite all"); a point's ``kinds`` is in the
  JSON (points of runs made before ``--kinds`` existed are KxK-only). When ``dsrewrite.RewriteConfig`` has a
  ``runtime`` field, each runtime's sweep is planned in that runtime (``--plan-in-each-runtime``, the default
  then); otherwise every plan is made in PyTorch eager and timed in every runtime (``"planned_in": "eager"``).
- L1 channel pruning: torch-pruning's ``MagnitudePruner`` with ``MagnitudeImportance(p=1)`` for a sweep of
  ``pruning_ratio`` (output layers keep their channels; on ONet also ``conv4``, whose channels reach
  ``dense5`` through a permute that torch-pruning maps to the wrong columns). Each pruned model is compared
  with the original with the removed channels zeroed (the Markdown gives the largest difference).

Latency, per runtime, of every variant against the original in the same runtime, side by side in interleaved
rounds (``dsrewrite.timing.measure.compare``: fastest of each, noise = half the IQR of the per-round ratios): PyTorch
eager and Inductor (``torch.compile`` of both, compiled before timing) each in the memory format faster for the
original there (``dsrewrite.timing.layers.best_memory_format``); onnxruntime (both exported as the CLI exports,
sessions with 2 intra-op threads, default graph optimisations). Metrics are measured in eager; the ONNX and
Inductor outputs are checked against eager. Torch runs with 2 threads.

Setup (benchmark-only dependencies; ``requests`` because facenet_pytorch's package imports it):

    pip install torch-pruning requests
    pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/wheels

Commands (the committed ``benchmarks/pareto.*`` come from the first -- the Markdown gives its wall time and the
machine's load; Inductor and the denser sweeps were left out of it to fit ~30 minutes on 2 shared cores with three
models and two dsrewrite curves; the issue-14 run with Inductor, 2026-12-01, is ``benchmarks/pareto.md`` at commit
57b1c9d -- every runtime's points planned in that runtime; ``--plan-in-eager-for inductor`` plans Inductor's points
in eager instead, with the first target also planned in Inductor as a probe, should planning there not fit the time
budget; ``--render`` rewrites the summary, tables and plot from a run's JSON without running anything):

    python benchmarks/pareto.py --facenet-wheel /tmp/wheels/facenet_pytorch-2.6.0-py3-none-any.whl \\
        --runtimes eager,onnxruntime --targets 0.8,0.6,0.4 --ratios 0.2,0.4,0.6 \\
        --json benchmarks/pareto.json --markdown benchmarks/pareto.md --plot benchmarks/pareto.png
    python benchmarks/pareto.py --quick --facenet-wheel /tmp/wheels/facenet_pytorch-2.6.0-py3-none-any.whl
    python benchmarks/pareto.py --runtimes eager,onnxruntime --models digits,mbnet --kinds all
    python benchmarks/pareto.py --render benchmarks/pareto.json --json benchmarks/pareto.json \\
        --markdown benchmarks/pareto.md --plot benchmarks/pareto.png
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import dsrewrite  # noqa: E402
from dsrewrite.finetune import fit  # noqa: E402
from dsrewrite.demo import DigitsCNN, accuracy, load_digits_data, loader, train_classifier  # noqa: E402
from dsrewrite.timing.layers import to_format  # noqa: E402
from dsrewrite.timing.measure import compare, count_flops, count_params  # noqa: E402
from planning import onet_from_wheel, rel, sample_crops  # noqa: E402

RUNTIMES = ("eager", "inductor", "onnxruntime")
THREADS = 2
REPS, MAX_SECONDS, MIN_REPS = 30, 6.0, 8  # interleaved rounds per comparison: up to 30, stop after 6 s once 8 are in
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One model with its data: what is timed, how it is scored and how a variant is distilled."""

    name: str
    title: str
    model: nn.Module
    x: torch.Tensor  # the timing batch (also the evaluation batch for ONet)
    calibration: Any
    metric: str  # the plotted metric
    higher_is_better: bool
    evaluate: Callable[[nn.Module], Dict[str, float]]
    distill: Callable[[nn.Module], Dict[str, Any]]
    ignored: Callable[[nn.Module], List[nn.Module]]  # layers whose output channels pruning keeps
    info: Dict[str, Any] = field(default_factory=dict)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise (stride ``stride``), 1x1 project; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class DigitsMBNet(nn.Module):
    """A 1x1-heavy network for 1x8x8 digits: a 3x3 stem (32), three inverted-residual blocks (32 -> 32, 32 -> 48
    at stride 2, 48 -> 48; expansion 4), a 1x1 head (192) and a linear classifier. About 90% of its multiply-adds
    are in 1x1 convs, which only ``kinds`` beyond ``"kxk"`` reach."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(32, 32), InvertedResidual(32, 48, stride=2),
                                    InvertedResidual(48, 48))
        self.head = nn.Sequential(nn.Conv2d(48, 192, 1, bias=False), nn.BatchNorm2d(192), nn.ReLU6())
        self.fc = nn.Linear(192, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


NETS = {"digits": (DigitsCNN, "digits CNN (dsrewrite.demo.DigitsCNN)"),
        "mbnet": (DigitsMBNet, "1x1-heavy inverted-residual network on the digits (DigitsMBNet)")}


def digits_task(quick: bool, epochs: int, seed: int = 0, name: str = "digits") -> Task:
    """A network trained on the digits (``name``: the digits CNN of ``dsrewrite demo`` or :class:`DigitsMBNet`),
    timed on the whole test set like ``run_digits``."""
    torch.manual_seed(seed)
    make, title = NETS[name]
    x_tr, y_tr, x_te, y_te = load_digits_data(seed)
    t0 = time.perf_counter()
    pre = 5 if quick else 30
    teacher = train_classifier(make(), x_tr, y_tr, epochs=pre, seed=seed).eval()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = teacher(x_te)

    def evaluate(m: nn.Module) -> Dict[str, float]:
        with torch.no_grad():
            out = m.eval()(x_te)
        return dict(accuracy=accuracy(m, x_te, y_te), logit_error=rel(out, ref))

    def distill(student: nn.Module) -> Dict[str, Any]:
        t = time.perf_counter()
        h = fit(student, teacher, loader(x_tr, y_tr, 64, seed + 1), epochs=epochs, lr=2e-3, layers=[],
                          feature_weight=0.0, train="all", progress=False)
        student.eval()
        return dict(seconds=time.perf_counter() - t, steps=h.steps, final_loss=h.epochs[-1]["loss"])

    return Task(name, title, teacher, x_te, x_tr[:512], "accuracy", True,
                evaluate, distill, lambda m: [m.fc],
                info=dict(train_images=len(x_tr), test_images=len(x_te), calibration_images=min(512, len(x_tr)),
                          pretrain_epochs=pre, pretrain_seconds=train_s, timing_input=list(x_te.shape),
                          pruning_keeps="fc (the classifier)",
                          distillation=f"dsrewrite.finetune.fit, {epochs} epoch(s) over the {len(x_tr)} training "
                                       "images "
                                       "(batch 64, lr 2e-3, train='all'): cross-entropy on the labels + KD (T=4) "
                                       "on the original's logits, no feature terms"))


def onet_task(wheel: str, quick: bool, epochs: int) -> Task:
    """MTCNN ONet with the wheel's weights, at batch 256 of 48x48 crops; distilled on other, unlabeled crops."""
    teacher = onet_from_wheel(wheel).eval()
    test, cal = sample_crops(256, 1), sample_crops(128, 0)
    train_x = sample_crops(256 if quick else 2048, 2)
    with torch.no_grad():
        ref = teacher(test)
        tgt = torch.cat(teacher(train_x), 1)
    scale = tgt.std(0).clamp_min(1e-3)  # every output coordinate weighs the same in the distillation loss

    def evaluate(m: nn.Module) -> Dict[str, float]:
        with torch.no_grad():
            out = m.eval()(test)
        return dict(box_error=rel(out[0], ref[0]), landmark_error=rel(out[1], ref[1]), prob_error=rel(out[2], ref[2]),
                    agreement=100.0 * float((out[2].argmax(1) == ref[2].argmax(1)).float().mean()))

    def distill(student: nn.Module) -> Dict[str, Any]:
        t = time.perf_counter()
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x, tgt), batch_size=64, shuffle=True,
                                           generator=torch.Generator().manual_seed(3))
        h = fit(student, teacher, data, epochs=epochs, lr=3e-4, layers=[], feature_weight=0.0,
                          logit_weight=0.0, train="all", progress=False,
                          output=lambda out: torch.cat(out, 1),
                          task_loss=lambda s, t: (((s - t) / scale) ** 2).mean())
        student.eval()
        return dict(seconds=time.perf_counter() - t, steps=h.steps, final_loss=h.epochs[-1]["loss"])

    return Task("onet", "facenet-pytorch MTCNN ONet (weights from the wheel)", teacher, test, cal, "box_error", False,
                evaluate, distill, lambda m: [m.conv4, m.dense6_1, m.dense6_2, m.dense6_3],
                info=dict(test_crops=len(test), calibration_crops=len(cal), distillation_crops=len(train_x),
                          timing_input=list(test.shape),
                          pruning_keeps="conv4 (its channels reach dense5 through permute(0, 3, 2, 1), which "
                                        "torch-pruning maps to the wrong columns) and the three heads",
                          distillation=f"dsrewrite.finetune.fit, {epochs} epoch(s) over {len(train_x)} unlabeled crops "
                                       "(batch 64, lr 3e-4, train='all'): mean squared error of the 16 output "
                                       "coordinates (box, landmarks, face probabilities) against the original's, "
                                       "each scaled by its std over those crops; no feature terms"))


# ---------------------------------------------------------------------------------------------- runtimes
def _compiled(model: nn.Module, args: tuple) -> Tuple[Callable, Dict[str, Any]]:
    """``torch.compile(model)`` (Inductor), compiled here by a first call (outside any timing), with its output
    checked against eager."""
    t0 = time.perf_counter()
    fn = torch.compile(model)
    with torch.no_grad():
        out = _first(fn(*args))
        ref = _first(model(*args))
    return fn, dict(compile_seconds=time.perf_counter() - t0, max_rel_vs_eager=_max_rel(out, ref))


def onnx_exporter() -> Callable[[nn.Module, tuple, str], None]:
    """How the CLI exports a rewritten model to ONNX (``dsrewrite.cli._export_onnx``)."""
    try:
        from dsrewrite.cli import _export_onnx

        return lambda m, a, path: _export_onnx(m, a, path, True)
    except ImportError:  # moved next to the runtimes
        from dsrewrite.timing.runtimes import export_onnx

        return lambda m, a, path: export_onnx(m, a, path)


def _first(out: Any) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _max_rel(outs: Sequence[Any], refs: Sequence[torch.Tensor]) -> float:
    return max(rel(torch.as_tensor(o), r) for o, r in zip(outs, refs))


class Timer:
    """The original of one task, prepared once per runtime in the memory format faster for it there (eager and
    Inductor: ``dsrewrite.timing.layers.best_memory_format`` on the original run in that runtime; onnxruntime: NCHW,
    it picks its own layouts); ``time(model, runtime)`` compares a variant with it."""

    def __init__(self, task: Task, folder: str) -> None:
        self.task, self.folder = task, folder
        self.args = (task.x,)
        self.fmt: Dict[str, str] = {}
        self.fmt_ms: Dict[str, Dict[str, float]] = {}
        self.base: Dict[str, Any] = {}
        self.export = onnx_exporter()
        self.count = 0

    def _original(self, runtime: str) -> Tuple[Callable, tuple, Dict[str, Any]]:
        """The original, ready to run in ``runtime`` in its faster memory format (chosen here, once)."""
        from dsrewrite.timing.layers import best_memory_format

        if runtime == "onnxruntime":
            self.fmt[runtime], self.fmt_ms[runtime] = "contiguous", {}
            return self._prepare(self.task.model, runtime)
        ready: Dict[str, Tuple[Callable, tuple, Dict[str, Any]]] = {}

        def original_in(fmt: str) -> Tuple[nn.Module, tuple, Callable]:
            if fmt not in ready:
                m, a = to_format(self.task.model, self.args, fmt)
                ready[fmt] = (m, a, {}) if runtime == "eager" else (*_compiled(m, a)[:1], a, {})
            fn, a, _ = ready[fmt]
            return self.task.model, a, fn

        with torch.no_grad():
            fmt, times = best_memory_format(original_in, self.args, torch.device("cpu"))
        self.fmt[runtime], self.fmt_ms[runtime] = fmt, times
        return ready[fmt] if fmt in ready else self._prepare(self.task.model, runtime)

    def _prepare(self, model: nn.Module, runtime: str) -> Tuple[Callable, tuple, Dict[str, Any]]:
        """A callable running ``model`` in ``runtime``, its arguments, and what preparing it took."""
        t0 = time.perf_counter()
        if runtime in ("eager", "inductor"):
            m, a = to_format(model.eval(), self.args, self.fmt[runtime])
            if runtime == "eager":
                return m, a, {}
            fn, extra = _compiled(m, a)
            return fn, a, extra
        from dsrewrite.onnx.measure import session

        self.count += 1
        path = os.path.join(self.folder, f"{self.task.name}_{self.count}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.export(model.eval(), self.args, path)
        s = session(path, THREADS)
        feeds = {s.get_inputs()[0].name: self.task.x.numpy()}
        outs = s.run(None, feeds)
        with torch.no_grad():
            ref = _first(model(*self.args))
        return s.run, (None, feeds), dict(export_seconds=time.perf_counter() - t0, max_rel_vs_eager=_max_rel(outs, ref),
                                          onnx_bytes=os.path.getsize(path))

    def time(self, model: nn.Module, runtime: str) -> Dict[str, Any]:
        """Ratio to the original in the same runtime (interleaved rounds), or the error that stopped it."""
        try:
            if runtime not in self.base:
                self.base[runtime] = self._original(runtime)
                log(f"{self.task.name}: original in {self.where(runtime)}")
            fn0, args, _ = self.base[runtime]
            fn1, _, extra = self._prepare(model, runtime)
            c = compare(fn0, fn1, args, reps=REPS, max_seconds=MAX_SECONDS, min_reps=MIN_REPS)
            return dict(ratio=c.ratio, noise=c.noise, before_ms=c.before_ms, after_ms=c.after_ms, rounds=c.rounds,
                        memory_format=self.fmt[runtime], loadavg_1min=round(os.getloadavg()[0], 2), **extra)
        except Exception as e:  # noqa: BLE001 - recorded for the point, not dropped
            return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")

    def where(self, runtime: str) -> str:
        fmt = "channels_last" if self.fmt.get(runtime) == "channels_last" else "NCHW"
        ms = ", ".join(f"{'NCHW' if k == 'contiguous' else k} {v:.1f} ms"
                       for k, v in self.fmt_ms.get(runtime, {}).items())
        if runtime == "onnxruntime":
            return f"onnxruntime (CPU, {THREADS} intra-op threads, graph optimisation 'all'), NCHW input"
        words = "PyTorch eager" if runtime == "eager" else "torch.compile (Inductor, default mode)"
        return f"{words}, {fmt}" + (f" (the original's faster layout here: {ms})" if ms else "")


# ---------------------------------------------------------------------------------------------- methods
def has_runtime_option() -> bool:
    return "runtime" in dsrewrite.RewriteConfig.__dataclass_fields__


def plan_dsrewrite(task: Task, target: float, runtime: Optional[str],
                   kinds: str = "kxk") -> Tuple[Optional[nn.Module], Dict[str, Any]]:
    """``rewrite(target_latency=target, kinds=kinds, calibration=...)`` planned in ``runtime`` (``None``: the
    default, eager)."""
    opts: Dict[str, Any] = dict(target_latency=target, kinds=tuple(kinds.split("+")) if "+" in kinds else kinds,
                                calibration=task.calibration, measure_time=True)
    if "strict" in dsrewrite.RewriteConfig.__dataclass_fields__:
        opts["strict"] = True  # a target no plan reaches is a refused point, not a best-effort plan
    if runtime is not None:
        opts["runtime"] = runtime
        if runtime == "onnxruntime":
            opts["ort_threads"] = THREADS
    t0 = time.perf_counter()
    try:
        try:
            res = dsrewrite.rewrite(task.model, task.x, **opts)
        except dsrewrite.DsrewriteError as e:
            if "ort_threads" not in opts or "ort_threads" not in str(e):
                raise
            opts.pop("ort_threads")  # this version refuses the option on the torch route: onnxruntime's default
            res = dsrewrite.rewrite(task.model, task.x, **opts)
    except dsrewrite.DsrewriteError as e:
        return None, dict(refused=str(e), plan_seconds=time.perf_counter() - t0)
    rep = res.report
    return res.model, dict(
        plan_seconds=time.perf_counter() - t0, ranks={L.name: L.rank for L in rep.layers},
        rewritten=len(rep.rewritten),
        rewritten_by_kind={k: sum(1 for L in rep.rewritten if getattr(L, "kind", "kxk") == k)
                           for k in ("kxk", "pointwise", "linear")},
        report_time_ratio=rep.time_ratio, report_time_noise=rep.time_noise, report_time_runtime=rep.time_runtime, ort_threads=opts.get("ort_threads"),
        latency_rounds=[_plain(r) for r in (rep.latency_rounds or [])])


def _plain(obj: Any) -> Any:
    """A JSON-friendly copy of a report entry (a dict or a dataclass of plain values)."""
    try:
        d = obj if isinstance(obj, dict) else vars(obj)
    except TypeError:
        return str(obj)
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def prune(task: Task, ratio: float) -> Tuple[nn.Module, Dict[str, Any]]:
    """L1 (magnitude, p=1) channel pruning of a copy with torch-pruning; checked against the original with the
    removed output channels zeroed."""
    import torch_pruning as tp

    t0 = time.perf_counter()
    model = copy.deepcopy(task.model).eval()
    names = {id(m): n for n, m in model.named_modules()}
    pruner = tp.pruner.MagnitudePruner(model, task.x[:2], importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=task.ignored(model))
    removed: Dict[str, List[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            mod = dep.target.module
            if id(mod) in names and getattr(dep.handler, "__name__", "") == "prune_out_channels":
                removed.setdefault(names[id(mod)], sorted(int(i) for i in idxs))
        group.prune()
    model.eval()
    # the same function: the original with the removed channels zeroed after every module that lost them
    masked = copy.deepcopy(task.model).eval()
    for name, idxs in removed.items():
        def zero(mod, a, out, idxs=idxs):
            out = out.clone()
            out[:, idxs] = 0
            return out
        masked.get_submodule(name).register_forward_hook(zero)
    with torch.no_grad():
        check = _max_rel(_first(model(task.x)), _first(masked(task.x)))
    return model, dict(plan_seconds=time.perf_counter() - t0, pruned_modules={k: len(v) for k, v in removed.items()},
                       check_vs_zeroed_original=check)


# ---------------------------------------------------------------------------------------------- the run
def run_task(task: Task, a: argparse.Namespace, runtimes: List[str], plan_runtimes: Dict[str, Optional[str]],
             probes: List[str], folder: str) -> Dict[str, Any]:
    """Every point of one task: planned or pruned, scored, distilled, scored again and timed."""
    args = (task.x,)
    flops0, params0 = count_flops(task.model, args), count_params(task.model)
    timer = Timer(task, folder)
    original = dict(flops=flops0, params=params0, metrics=task.evaluate(task.model))
    points: List[Dict[str, Any]] = []

    def finish(model: nn.Module, p: Dict[str, Any], timed_in: List[str]) -> None:
        p["flops_kept"] = count_flops(model, args) / flops0
        p["params_kept"] = count_params(model) / params0
        p["before"] = task.evaluate(model)
        p["distill"] = task.distill(model)
        p["after"] = task.evaluate(model)
        p["latency"] = {}
        for rt in timed_in:
            p["latency"][rt] = timer.time(model, rt)
        lat = ", ".join(f"{rt} {v['ratio']:.2f}x" if "ratio" in v else f"{rt} failed" for rt, v in p["latency"].items())
        log(f"{task.name}: {curve(p)} {p['knob']:g}: FLOPs {p['flops_kept']:.2f}, {task.metric} "
            f"{p['before'][task.metric]:.3f} -> {p['after'][task.metric]:.3f}, {lat}")

    # dsrewrite: one sweep per planning runtime, timed in the runtimes that use it; then the probes: the first
    # target planned in a runtime whose sweep was planned in eager, timed there
    sweeps = [(kinds, plan_rt, t, [rt for rt in runtimes if plan_runtimes[rt] == plan_rt], False)
              for kinds in a.kinds for plan_rt in dict.fromkeys(plan_runtimes.values()) for t in a.targets]
    sweeps += [(kinds, rt, a.targets[0], [rt], True) for kinds in a.kinds for rt in probes]
    for kinds, plan_rt, t, timed_in, probe in sweeps:
        log(f"{task.name}: dsrewrite kinds={kinds} target_latency={t:g}, planned in {plan_rt or 'eager'}"
            f"{' (probe)' if probe else ''} ...")
        model, p = plan_dsrewrite(task, t, plan_rt, kinds)
        p.update(method="dsrewrite", kinds=kinds, knob=t, planned_in=plan_rt or "eager", timed_in=timed_in,
                 probe=probe)
        points.append(p)
        if model is None:
            log(f"{task.name}: refused: {p['refused'][:200]}")
            continue
        finish(model, p, timed_in)
    for r in a.ratios:
        log(f"{task.name}: L1 pruning ratio {r:g} ...")
        try:
            model, p = prune(task, r)
        except Exception as e:  # noqa: BLE001 - recorded, not dropped
            points.append(dict(method="pruning", knob=r, error=f"{type(e).__name__}: {e}"[:300]))
            continue
        p.update(method="pruning", knob=r, timed_in=list(runtimes))
        points.append(p)
        finish(model, p, list(runtimes))
    return dict(title=task.title, metric=task.metric, higher_is_better=task.higher_is_better, info=task.info,
                original=original, memory_format=timer.fmt, memory_format_ms=timer.fmt_ms,
                where={rt: timer.where(rt) for rt in runtimes}, points=points)


# ---------------------------------------------------------------------------------------------- summary
def curve(p: Dict[str, Any]) -> str:
    """The curve a point is on: ``"pruning"``, ``"dsrewrite kxk"`` or ``"dsrewrite all"`` (points of runs made
    before ``--kinds`` existed were KxK-only)."""
    return "pruning" if p["method"] == "pruning" else f"dsrewrite {p.get('kinds', 'kxk')}"


def curves(res: Dict[str, Any]) -> List[str]:
    """The dsrewrite curves of a task, in the order they were run."""
    return list(dict.fromkeys(curve(p) for p in res["points"] if p["method"] == "dsrewrite"))


def timed_points(res: Dict[str, Any], method: str, runtime: str) -> List[Dict[str, Any]]:
    """The points of one curve (``method``: a :func:`curve` label) timed in ``runtime``."""
    return [p for p in res["points"] if curve(p) == method and "ratio" in p.get("latency", {}).get(runtime, {})]


def distinct(points: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Points with distinct plans: two targets that gave the same ranks (same FLOPs, parameters and metrics) are
    one model timed twice; the first (the milder target) is kept, so a plan is not counted twice."""
    seen, out = set(), []
    for p in points:
        sig = (json.dumps(p.get("ranks"), sort_keys=True), round(p["flops_kept"], 6), round(p["params_kept"], 6),
               json.dumps(p["after"], sort_keys=True))
        if p["method"] != "dsrewrite" or sig not in seen:
            out.append(p)
        seen.add(sig)
    return out


def summarise(name: str, res: Dict[str, Any], runtime: str) -> List[str]:
    """Where each dsrewrite curve and pruning win in one runtime, and where all kinds move dsrewrite's lowest
    measured latency relative to KxK only."""
    lines: List[str] = []
    for dc in curves(res):
        lines += summarise_curve(name, res, runtime, dc)
    floors = {}
    for dc in curves(res) + ["pruning"]:
        pts = distinct(timed_points(res, dc, runtime))
        if pts:
            floors[dc] = min(pts, key=lambda p: p["latency"][runtime]["ratio"])
    if len(floors) > 1:
        key = res["metric"]
        fmt = (lambda v: f"{v:.1f}%") if key == "accuracy" else (lambda v: f"{v:.3f}")  # noqa: E731
        parts = [f"{dc} {p['latency'][runtime]['ratio']:.2f}x (+-{p['latency'][runtime]['noise']:.2f}; "
                 f"{key} {fmt(p['after'][key])} after distillation)" for dc, p in floors.items()]
        lines.append(f"{name}, {runtime}: lowest measured latency per curve: " + ", ".join(parts) + ".")
    return lines


def summarise_curve(name: str, res: Dict[str, Any], runtime: str, dcurve: str) -> List[str]:
    """Where one dsrewrite curve (``dcurve``) and pruning each win in one runtime, from the measured points (after
    distillation, and before)."""
    key, hib = res["metric"], res["higher_is_better"]
    pct = key == "accuracy"
    fmt = (lambda v: f"{v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    unit = " points" if pct else ""
    # accuracy counts whole test images: a difference of one image or less is a tie
    tol = 100.0 / res["info"]["test_images"] * 1.001 if pct else 0.0
    better = (lambda u, v: u > v + tol) if hib else (lambda u, v: u < v - tol)
    tried = [p for p in res["points"] if curve(p) == dcurve and runtime in p.get("timed_in", [])]
    refused = sum("refused" in p for p in tried)
    ds, pr = distinct(timed_points(res, dcurve, runtime)), timed_points(res, "pruning", runtime)
    head = f"{name}, {runtime}, {dcurve} vs pruning"
    if not ds or not pr:
        return [f"{head}: no comparison ({len(ds)} {dcurve} and {len(pr)} pruning points timed; {refused} of "
                f"{len(tried)} {dcurve} targets refused)."]
    t = lambda p: p["latency"][runtime]["ratio"]  # noqa: E731
    fd, fp = min(ds, key=t), min(pr, key=t)
    faster, slower = ("pruning", fd) if t(fp) < t(fd) else (dcurve, fp)
    noise = max(fd["latency"][runtime]["noise"], fp["latency"][runtime]["noise"])
    where = (f"within the noise of each other (+-{noise:.2f})" if abs(t(fd) - t(fp)) <= noise
             else f"below {t(slower):.2f}x only {faster} has points")
    lines = [f"{head}: lowest measured latency: pruning {t(fp):.2f}x (ratio {fp['knob']:g}, {key} "
             f"{fmt(fp['after'][key])} after distillation), {dcurve} {t(fd):.2f}x (target {fd['knob']:g}, "
             f"{fmt(fd['after'][key])}): {where}. {dcurve}: {refused} of {len(tried)} targets refused, "
             f"{len(ds)} distinct plan(s) timed."]

    def best_at(points: List[Dict[str, Any]], limit: float, stage: str) -> Optional[Dict[str, Any]]:
        ok = [p for p in points if t(p) <= limit]
        if not ok:
            return None
        return max(ok, key=lambda p: p[stage][key]) if hib else min(ok, key=lambda p: p[stage][key])

    for stage, words in (("after", "after distillation"), ("before", "before distillation")):
        wins: Dict[str, List[Tuple[float, float]]] = {dcurve: [], "pruning": []}
        ties = 0
        for mine, other in ((ds, pr), (pr, ds)):  # each point against the other method's best point no slower
            for p in mine:
                q = best_at(other, t(p), stage)
                if q is None:
                    continue
                u, v = p[stage][key], q[stage][key]
                if better(u, v):
                    wins[curve(p)].append((t(p), abs(u - v)))
                elif better(v, u):
                    wins[curve(q)].append((t(p), abs(u - v)))
                else:
                    ties += 1
        nd, npr = len(wins[dcurve]), len(wins["pruning"])
        n = nd + npr + ties
        if n == 0:
            lines.append(f"{head}, {words}: no time ratio where both methods have a point.")
            continue
        parts = []
        for m in (dcurve, "pruning"):
            if wins[m]:
                ts = sorted({round(x, 2) for x, _ in wins[m]})
                span = f"{ts[0]:.2f}x" if len(ts) == 1 else f"{ts[0]:.2f}-{ts[-1]:.2f}x"
                parts.append(f"{m} better at {len(wins[m])} (at {span}, by up to "
                             f"{max(d for _, d in wins[m]):.3g}{unit} of {key})")
            else:
                parts.append(f"{m} better at 0")
        if ties:
            parts.append(f"tied at {ties}" + (" (within one test image)" if pct else ""))
        verdict = ("mostly tied" if ties > nd + npr else f"{dcurve} ahead" if nd > npr else "pruning ahead" if npr > nd
                   else "even")
        lines.append(f"{head}, {words}: each point against the other method's best point at equal or lower measured "
                     f"latency ({n} comparisons): " + ", ".join(parts) + f" -> {verdict}.")
    return lines


# ---------------------------------------------------------------------------------------------- output
def _f(v: Optional[float], spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(out: Dict[str, Any]) -> str:
    m = out["meta"]
    L = ["## Pareto: dsrewrite (KxK convs only, and every weight layer) vs L1 channel pruning (issues 14 and 22)", "",
         f"- Date: {m['date']}; machine: {m['machine']}; torch {m['torch']} ({m['torch_threads']} threads), "
         f"torch-pruning {m['torch_pruning']}, onnxruntime {m['onnxruntime']}; dsrewrite {m['dsrewrite_source']}.",
         f"- Command: `{m['command']}` (wall time {m['wall_seconds'] / 60:.1f} min; load average at start / end "
         f"{m['loadavg_start']} / {m['loadavg_end']}).",
         *([f"- Rendered: `{out['rendered']}`."] if out.get("rendered") else []),
         f"- dsrewrite planned in: {out['planned_in']}. {out['planned_in_note']}",
         "- Time ratio: the variant against the original in the same runtime, measured side by side in interleaved "
         "rounds (fastest of each; +- is half the IQR of the per-round ratios). Metrics in PyTorch eager; 'after' is "
         "after the same short distillation for every method.",
         "- Curves: 'dsrewrite kxk' rewrites KxK convs only (separable pairs); 'dsrewrite all' also 1x1 convs and "
         "linear layers (low-rank pairs), one target_latency budget over all of them; a dsrewrite knob's "
         "'(a/b/c)' counts the rewritten KxK / 1x1 / linear layers.", ""]
    for name, res in out["tasks"].items():
        info = res["info"]
        key = res["metric"]
        o = res["original"]["metrics"]
        L += [f"### {res['title']}", "",
              f"Timing input {info['timing_input']}; {info['distillation']}. "
              + (f"Original: test accuracy {o['accuracy']:.2f}% on {info['test_images']} images. " if "accuracy" in o
                 else f"Errors are relative (Frobenius) to the original's outputs on the {info.get('test_crops')} "
                      "test crops; agreement: same face / no-face decision as the original. ")
              + (f"Pruning keeps the output channels of {info['pruning_keeps']}." if info.get("pruning_keeps") else ""),
              ""]
        if key != "accuracy":
            cols = "box err before -> after | landmark err after | face-prob err after | agreement before -> after"
            row = lambda p: (f"{p['before']['box_error']:.3f} -> {p['after']['box_error']:.3f} | "  # noqa: E731
                             f"{p['after']['landmark_error']:.3f} | {p['after']['prob_error']:.3f} | "
                             f"{p['before']['agreement']:.1f}% -> {p['after']['agreement']:.1f}%")
            ncol = 4
        else:
            cols = "accuracy before -> after | logit err after"
            row = lambda p: (f"{p['before']['accuracy']:.2f}% -> {p['after']['accuracy']:.2f}% | "  # noqa: E731
                             f"{p['after']['logit_error']:.3f}")
            ncol = 2
        for rt, where in res["where"].items():
            L += [f"#### {name}, {rt}: {where}", "",
                  "| method | knob | planned in | plan s | FLOPs kept | params kept | original ms | variant ms | "
                  f"time ratio (noise) | {cols} |",
                  "|---|---|---|---|---|---|---|---|---|" + "---|" * ncol]
            for p in res["points"]:
                if rt not in p.get("timed_in", [rt]):
                    continue
                knob = (f"target {p['knob']:g}" if p["method"] == "dsrewrite" else f"ratio {p['knob']:g}")
                rk = p.get("rewritten_by_kind")
                if rk:
                    knob += f" ({rk['kxk']}/{rk['pointwise']}/{rk['linear']})"
                planned = p.get("planned_in", "-") + (" (probe)" if p.get("probe") else "")
                secs = _f(p.get("plan_seconds"), ".0f")
                if "refused" in p or "error" in p:
                    msg = (p.get("refused") or p.get("error")).replace("|", "/")[:220]
                    cells = [curve(p), knob, planned, secs, ("refused: " if "refused" in p else "failed: ") + msg]
                    L.append("| " + " | ".join(cells + [""] * (4 + ncol)) + " |")
                    continue
                lat = p["latency"].get(rt, {})
                tr = (f"{lat['ratio']:.2f} (+-{lat['noise']:.2f})" if "ratio" in lat
                      else "failed: " + lat.get("error", "?").replace("|", "/")[:160])
                L.append(f"| {curve(p)} | {knob} | {planned} | {secs} | {p['flops_kept']:.3f} | "
                         f"{p['params_kept']:.3f} | {_f(lat.get('before_ms'), '.1f')} | "
                         f"{_f(lat.get('after_ms'), '.1f')} | "
                         f"{tr} | {row(p)} |")
            L.append("")
        checks = []
        for p in res["points"]:
            for rt, lat in p.get("latency", {}).items():
                if lat.get("max_rel_vs_eager") is not None:
                    checks.append((rt, curve(p), lat["max_rel_vs_eager"]))
        for rt in ("onnxruntime", "inductor"):
            for meth in curves(res) + ["pruning"]:
                v = [c for r, mm, c in checks if r == rt and mm == meth]
                if v:
                    L.append(f"- {rt} outputs vs eager, {meth}: largest relative error {max(v):.1e} over {len(v)} "
                             "models.")
        pc = [p["check_vs_zeroed_original"] for p in res["points"] if "check_vs_zeroed_original" in p]
        if pc:
            L.append(f"- Pruned models vs the original with the removed channels zeroed (before distillation): largest "
                     f"relative error {max(pc):.1e} over {len(pc)} models.")
        L.append("")
    L += ["### Where each wins (computed from the rows above)", ""]
    L += [f"- {s}" for s in out["summary"]]
    if out.get("plot"):
        L += ["", f"Plot: `{out['plot']}` (x: measured time ratio in each runtime, with the noise; y: the digits' test "
              "error (100 - accuracy, symlog) and ONet's box error (log), lower is better; filled: after distillation, "
              "hollow: before; star: the original, digits tasks only, as ONet's errors are relative to it; lines: each "
              "method's best error at that time ratio or less)."]
    return "\n".join(L) + "\n"


def plot(out: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(out["tasks"].items())
    runtimes = out["runtimes"]
    fig, axes = plt.subplots(len(tasks), len(runtimes), figsize=(4.6 * len(runtimes), 3.8 * len(tasks)), squeeze=False)
    legend: Dict[str, Any] = {}
    style = {"dsrewrite kxk": ("tab:blue", "o"), "dsrewrite all": ("tab:green", "^"), "pruning": ("tab:orange", "s")}
    for i, (name, res) in enumerate(tasks):
        key = res["metric"]
        for j, rt in enumerate(runtimes):
            ax = axes[i][j]
            y = (lambda v: 100.0 - v) if key == "accuracy" else (lambda v: v)  # noqa: E731
            for meth, (col, mk) in style.items():
                pts = sorted(timed_points(res, meth, rt), key=lambda p: p["latency"][rt]["ratio"])
                if not pts:
                    continue
                xs = [p["latency"][rt]["ratio"] for p in pts]
                ns = [p["latency"][rt]["noise"] for p in pts]
                ys = [y(p["after"][key]) for p in pts]
                ax.errorbar(xs, ys, xerr=ns, color=col, marker=mk, ls="none", ms=6, capsize=2,
                            label=f"{meth}, distilled (+- noise)")
                ax.scatter(xs, [y(p["before"][key]) for p in pts], facecolors="none", edgecolors=col, marker=mk, s=36,
                           label=f"{meth}, before distillation")
                fx, fy = [], []  # the method's front after distillation: the best error at this time ratio or less
                for xv, yv in zip(xs, ys):
                    if not fy or yv < fy[-1]:
                        fx.append(xv)
                        fy.append(yv)
                ax.step(fx + [max(xs + [1.0])], fy + fy[-1:], where="post", color=col, lw=1, alpha=0.6)
            ax.scatter([1.0], [y(res["original"]["metrics"][key])], color="k", marker="*", s=80, label="original")
            ax.set_title(f"{name}: {rt}", fontsize=10)
            ax.set_xlabel(f"time ratio to the original ({rt})")
            if key == "accuracy":  # test error, so that 0.3% and 50% both show
                ax.set_ylabel("test error = 100 - accuracy (%)")
                ax.set_yscale("symlog", linthresh=0.5)
            else:
                ax.set_ylabel(key.replace("_", " ") + " (relative)")
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            for h, lab in zip(*ax.get_legend_handles_labels()):  # every curve's entry, whichever panel has it
                legend.setdefault(lab, h)
    fig.suptitle(f"dsrewrite (target_latency, KxK only / all kinds, planned in {out['planned_in']}) vs L1 channel "
                 f"pruning\nlines: each method's best error at that time ratio or less; {out['meta']['date']}, "
                 f"{out['meta']['machine']}", fontsize=9)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 4), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=os.path.dirname(dsrewrite.__file__), capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import torch_pruning

    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", ".")
    src = f"commit {head}" + (" + uncommitted changes in dsrewrite/" if dirty else "") if head else "unknown"
    try:
        tp_version = importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        tp_version = getattr(torch_pruning, "__version__", "?")
    return dict(torch=torch.__version__, torch_pruning=tp_version,
                onnxruntime=onnxruntime.__version__, onnx=onnx.__version__, python=platform.python_version(),
                dsrewrite_source=src)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facenet-wheel",
                    help="facenet_pytorch wheel (ONet's weights are inside); ONet is skipped without it")
    ap.add_argument("--models", default="digits,mbnet,onet", help="comma list: digits, mbnet, onet")
    ap.add_argument("--kinds", default="kxk,all", help="comma list of dsrewrite kinds= values, one curve each "
                    "(kxk, all, or a '+'-joined list such as pointwise+linear)")
    ap.add_argument("--runtimes", default=None, help="comma list of eager, inductor, onnxruntime "
                    "(default: all three; --quick: eager,onnxruntime)")
    ap.add_argument("--targets", default=None, help="target_latency sweep (default 0.9,0.8,0.7,0.6,0.5,0.4)")
    ap.add_argument("--ratios", default=None, help="pruning_ratio sweep (default 0.1,0.2,0.3,0.4,0.5,0.6)")
    ap.add_argument("--epochs", type=int, default=None, help="distillation epochs (default 3; --quick 1)")
    ap.add_argument("--plan-in-each-runtime", action=argparse.BooleanOptionalAction, default=None,
                    help="plan each runtime's dsrewrite sweep in it (rewrite(runtime=...)); default on when "
                         "RewriteConfig has a runtime field")
    ap.add_argument("--plan-in-eager-for", default="", help="runtimes whose dsrewrite points are planned in eager even "
                    "with --plan-in-each-runtime (e.g. inductor, when planning there is too slow)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sweeps, 1 epoch, no Inductor unless asked")
    ap.add_argument("--json", help="write everything here")
    ap.add_argument("--markdown", help="write the tables and the summary here")
    ap.add_argument("--plot", help="write the plot (PNG) here")
    ap.add_argument("--render", metavar="JSON", help="no run: rewrite the summary, Markdown and plot from this JSON of "
                    "an earlier run (its numbers and command are kept)")
    a = ap.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            return write(json.load(f), a)
    torch.set_num_threads(THREADS)
    # every variant of a model shares its forward's code object: let Inductor compile each, not fall back to eager
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 512)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    runtimes = [r for r in (a.runtimes or ("eager,onnxruntime" if a.quick else ",".join(RUNTIMES))).split(",") if r]
    for r in runtimes:
        if r not in RUNTIMES:
            ap.error(f"unknown runtime {r!r} (choose from {', '.join(RUNTIMES)})")
    a.targets = [float(v) for v in (a.targets or ("0.9,0.6" if a.quick else "0.9,0.8,0.7,0.6,0.5,0.4")).split(",")]
    a.ratios = [float(v) for v in (a.ratios or ("0.3" if a.quick else "0.1,0.2,0.3,0.4,0.5,0.6")).split(",")]
    epochs = a.epochs or (1 if a.quick else 3)
    a.kinds = [k for k in a.kinds.split(",") if k]
    available = has_runtime_option()
    each = available if a.plan_in_each_runtime is None else a.plan_in_each_runtime
    if each and not available:
        ap.error("--plan-in-each-runtime: this dsrewrite's RewriteConfig has no runtime field")
    eager_for = {r for r in a.plan_in_eager_for.split(",") if r}
    probes = [rt for rt in runtimes if each and rt in eager_for and rt != "eager"]
    plan_runtimes: Dict[str, Optional[str]] = {
        rt: (rt if each and rt not in eager_for else ("eager" if each else None)) for rt in runtimes}
    if each:
        planned_in = "each runtime" if not eager_for & set(runtimes) else (
            "each runtime, except " + ", ".join(sorted(eager_for & set(runtimes))) + " (planned in eager)")
        note = ("rewrite(..., runtime=R) per runtime R: layers and the whole model timed in R while planning; "
                "each runtime's table has its own dsrewrite points.")
        if probes:
            note += (f" {', '.join(probes)}: planned in eager (--plan-in-eager-for) to keep the run within its time "
                     f"budget, as planning there compiles every candidate layer; the first target "
                     f"({a.targets[0]:g}) was also planned there (the 'probe' row, with its planning seconds).")
    else:
        planned_in = "eager"
        note = ("this dsrewrite has no runtime= option" if not available else "--no-plan-in-each-runtime") + \
               ": every dsrewrite point was planned in PyTorch eager (report.time_runtime) and timed in every runtime."
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
                cpu_count=os.cpu_count(), torch_threads=THREADS, ort_intra_op_threads=THREADS,
                command="python benchmarks/pareto.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                loadavg_start=[round(v, 2) for v in os.getloadavg()], **_versions())
    log(f"runtimes {runtimes}; dsrewrite planned in {planned_in}; targets {a.targets}; ratios {a.ratios}; "
        f"{epochs} distillation epoch(s)")
    out: Dict[str, Any] = dict(meta=meta, runtimes=runtimes, planned_in=planned_in, planned_in_note=note,
                               runtime_option_available=available, targets=a.targets, ratios=a.ratios, kinds=a.kinds,
                               distill_epochs=epochs, tasks={})
    models = [m for m in a.models.split(",") if m]
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            if name == "onet" and not a.facenet_wheel:
                log("onet skipped: no --facenet-wheel")
                continue
            torch.manual_seed(0)
            if name in NETS:
                task = digits_task(a.quick, epochs, name=name)
            elif name == "onet":
                task = onet_task(a.facenet_wheel, a.quick, epochs)
            else:
                ap.error(f"unknown model {name!r}")
            log(f"{name}: original {task.evaluate(task.model)}")
            torch._dynamo.reset()
            out["tasks"][name] = run_task(task, a, runtimes, plan_runtimes, probes, folder)
    meta["wall_seconds"] = time.perf_counter() - _T0
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    return write(out, a)


def write(out: Dict[str, Any], a: argparse.Namespace) -> int:
    """The summary (computed from the points), then the plot, the Markdown and the JSON."""
    out["summary"] = [line for name, res in out["tasks"].items() for rt in out["runtimes"]
                      for line in summarise(name, res, rt)]
    out["plot"] = a.plot
    if a.render:
        out["rendered"] = ("python benchmarks/pareto.py " + " ".join(sys.argv[1:]) + f" ({datetime.date.today()}; "
                           "summary, tables and plot rewritten from the run's JSON, numbers unchanged)")
    if a.plot:
        plot(out, a.plot)
    md = markdown(out)
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    log(f"done in {out['meta']['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
