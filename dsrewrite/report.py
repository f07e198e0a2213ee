"""The savings report: per-layer and whole-model parameters, FLOPs, measured time and approximation error.

FLOPs are 2 x multiply-adds (``torch.utils.flop_counter.FlopCounterMode``'s convention); MACs are half.
Renders as a terminal table, Markdown and JSON (``Report.from_json(r.to_json())`` round-trips). FLOPs of a
conv whose output shape is unknown are 0 in memory (the cost model's convention), ``?`` in the table and
Markdown and ``null`` in JSON: never a claimed 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import DsrewriteError

__all__ = ["LayerReport", "Report", "flops_known", "build_report"]

SCHEMA_VERSION = 2  # 2: LayerReport.kind is the layer kind (kxk/pointwise/linear), origin where it came from


@dataclass
class LayerReport:
    """One convolution the pass considered. ``reason`` says why it was skipped (``rewritten=False``)."""

    name: str
    rewritten: bool
    reason: Optional[str] = None
    rank: Optional[int] = None
    in_channels: int = 0
    out_channels: int = 0
    kernel: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    groups: int = 1
    kind: str = "kxk"  # "kxk" (separable pair), "pointwise" (1x1 conv) or "linear" (low-rank pairs)
    origin: str = "module"  # where the frontend found it: "module", "function" (F.conv*d / F.linear), "onnx"
    policy: Optional[str] = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    error: Optional[float] = None
    note: Optional[str] = None
    time_before_ms: Optional[float] = None
    time_after_ms: Optional[float] = None
    calib_error_before: Optional[float] = None
    calib_error_after: Optional[float] = None
    channel_ranks: Optional[List[int]] = None  # ragged ranks: depthwise filters per input channel
    gather_input: bool = False  # runs its depthwise conv on a gathered copy of the input (measured faster)

    @property
    def rank_text(self) -> str:
        """The rank column: ``2``, ``2 (ragged 0-7)`` with per-channel ranks, ``2 (gathered)`` in that form."""
        if self.rank is None:
            return "-"
        if self.channel_ranks:
            return f"{self.rank} (ragged {min(self.channel_ranks)}-{max(self.channel_ranks)})"
        return f"{self.rank} (gathered)" if self.gather_input else str(self.rank)

    @property
    def flops_ratio(self) -> Optional[float]:
        return _ratio(self.flops_after, self.flops_before)

    @property
    def params_ratio(self) -> Optional[float]:
        return _ratio(self.params_after, self.params_before)


@dataclass
class Report:
    """What the pass did to a model. Totals are whole-model (every op, not only the convs)."""

    layers: List[LayerReport] = field(default_factory=list)
    model: str = ""
    route: str = ""
    input_shapes: List[List[Any]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    flops_per_sample: bool = False
    flops_partial: Optional[str] = None  # the totals leave out ops of unknown shape: which, and what would count them
    time_before_ms: Optional[float] = None
    time_after_ms: Optional[float] = None
    time_device: Optional[str] = None
    time_backend: Optional[str] = None
    time_runtime: Optional[str] = None  # what ran the models when timed, and in which memory format
    time_noise: Optional[float] = None  # half the interquartile range of the per-round time ratios
    time_median_ratio: Optional[float] = None  # the median per-round time ratio (what latency targets are judged on)
    latency_rounds: List[Dict[str, Any]] = field(default_factory=list)  # target_latency: planned vs measured
    notes: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ summaries
    @property
    def rewritten(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.rewritten]

    @property
    def skipped(self) -> List[LayerReport]:
        return [layer for layer in self.layers if not layer.rewritten]

    @property
    def flops_ratio(self) -> Optional[float]:
        return _ratio(self.flops_after, self.flops_before)

    @property
    def params_ratio(self) -> Optional[float]:
        return _ratio(self.params_after, self.params_before)

    def add_outcome_notes(self) -> None:
        """The notes every route adds: nothing found, nothing rewritten, rewritten layers that cost more."""
        if not self.layers:
            self.notes.append("no convolution or linear layer found: nothing to rewrite")
        elif not self.rewritten:
            self.notes.append("no eligible layer was rewritten: see the reasons per layer")
        if any(L.note and "costs more" in L.note for L in self.rewritten):
            self.notes.append("some rewritten layers cost more than the original (rank at or near full rank)")

    @property
    def time_ratio(self) -> Optional[float]:
        if self.time_before_ms and self.time_after_ms is not None:
            return self.time_after_ms / self.time_before_ms
        return None

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        """The JSON data: unknown FLOPs (see :func:`flops_known`) are ``None``, not 0."""
        d = dataclasses.asdict(self)
        d["schema"] = SCHEMA_VERSION
        for L, item in zip(self.layers, d["layers"]):
            if not flops_known(L):
                item["flops_before"] = item["flops_after"] = None
        if not self._total_flops_known():
            d["flops_before"] = d["flops_after"] = None
        return d

    def _total_flops_known(self) -> bool:
        """False when the totals are 0 only because convs have unknown shapes (otherwise a note says what
        the totals leave out)."""
        return bool(self.flops_before) or all(flops_known(L) for L in self.layers)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None, indent: int = 2) -> str:
        """Serialise to JSON; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Report":
        known = {f.name: f for f in dataclasses.fields(LayerReport)}
        layers = []
        for item in d.get("layers", []):
            item = _unknown_flops_to_default({k: v for k, v in item.items() if k in known}, known)
            if d.get("schema", 1) < 2:  # schema 1: ``kind`` was the origin and every layer a conv
                item["origin"] = item.pop("kind", "module")
                kernel = item.get("kernel") or ()
                item["kind"] = "pointwise" if kernel and all(k == 1 for k in kernel) else "kxk"
            for key in ("kernel", "stride"):
                if key in item and item[key] is not None:
                    item[key] = tuple(item[key])
            layers.append(LayerReport(**item))
        top = {f.name: f for f in dataclasses.fields(cls) if f.name != "layers"}
        return cls(layers=layers, **_unknown_flops_to_default({k: v for k, v in d.items() if k in top}, top))

    @classmethod
    def from_json(cls, text_or_path: Union[str, os.PathLike]) -> "Report":
        """Load a report from a JSON string or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            if not os.path.exists(text):
                raise DsrewriteError(f"report file not found: {text}")
            with open(text) as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DsrewriteError(f"report is not valid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(data, dict) or "layers" not in data:
            raise DsrewriteError("report JSON has no 'layers': not a dsrewrite report")
        return cls.from_dict(data)

    # ------------------------------------------------------------------ rendering
    def _rows(self) -> Tuple[List[str], List[List[str]]]:
        head = ["layer", "kernel", "Cin->Cout", "rank", "params", "FLOPs", "FLOPs kept", "weight err", "status"]
        rows = []
        for L in self.layers:
            kernel = "linear" if L.kind == "linear" else "x".join(str(k) for k in L.kernel)
            if L.rewritten:
                status = "rewritten" + (f" ({L.note})" if L.note else "")
                known = flops_known(L)
                rows.append([
                    L.name, kernel, f"{L.in_channels}->{L.out_channels}", L.rank_text,
                    f"{_num(L.params_before)}->{_num(L.params_after)}",
                    f"{_num(L.flops_before)}->{_num(L.flops_after)}" if known else "?",
                    _pct(L.flops_ratio) if known else "?", f"{L.error:.3f}" if L.error is not None else "-", status,
                ])
            else:
                rows.append([
                    L.name, kernel, f"{L.in_channels}->{L.out_channels}", "-",
                    _num(L.params_before), _num(L.flops_before) if flops_known(L) else "?", "-", "-",
                    f"skipped: {L.reason}",
                ])
        # planning columns (issue 6), only when some layer has them: layer time and calibration error
        extra = []
        if any(L.time_before_ms is not None for L in self.layers):
            extra.append(("layer ms", lambda L: "-" if L.time_before_ms is None else (
                f"{L.time_before_ms:.3f}->{L.time_after_ms:.3f}" if L.rewritten else f"{L.time_before_ms:.3f}")))
        if any(L.calib_error_after is not None for L in self.layers):
            extra.append(("calib err (svd->fit)", lambda L: "-" if L.calib_error_after is None else
                          f"{L.calib_error_before:.3f}->{L.calib_error_after:.3f}"))
        for title, cell in extra:
            head.insert(len(head) - 1, title)
            for L, row in zip(self.layers, rows):
                row.insert(len(row) - 1, cell(L))
        return head, rows

    def _summary_lines(self) -> List[str]:
        per = " per sample" if self.flops_per_sample else ""
        partial = f"; partial: {self.flops_partial}" if self.flops_partial and self._total_flops_known() else ""
        if self._total_flops_known():
            flops = (f"{_num(self.flops_before)} -> {_num(self.flops_after)} ({_pct(self.flops_ratio)})"
                     f"   MACs: {_num(self.flops_before // 2)} -> {_num(self.flops_after // 2)}")
        else:
            flops = "? (unknown shapes)"
        lines = [
            f"model: {self.model or '?'}   route: {self.route or '?'}   "
            f"layers: {len(self.rewritten)} rewritten{_by_kind(self.rewritten)}, {len(self.skipped)} skipped",
            f"params: {_num(self.params_before)} -> {_num(self.params_after)} ({_pct(self.params_ratio)})",
            f"FLOPs{per} (2 x MACs{partial}): {flops}",
        ]
        if self.time_before_ms is not None and self.time_after_ms is not None:
            where = ", ".join(x for x in (self.time_device, self.time_runtime, self.time_backend) if x)
            noise = f", noise +-{self.time_noise:.2f}" if self.time_noise else ""
            if self.time_median_ratio is not None:
                noise += f"; median per round {self.time_median_ratio:.2f}x"
            lines.append(
                f"measured time{f' ({where})' if where else ''}: {self.time_before_ms:.2f} ms -> "
                f"{self.time_after_ms:.2f} ms ({self.time_ratio:.2f}x the original's time{noise})"
            )
        else:
            lines.append("time: not measured")
        for i, r in enumerate(self.latency_rounds, 1):
            if r.get("measured") is None:
                lines.append(f"latency plan {i}: none ({r.get('refused')})")
                continue
            planned = "?" if r.get("planned") is None else f"{r['planned']:.2f}x"
            measured = (f"{r['measured']:.2f}x" if r.get("median") is None else
                        f"{r['median']:.2f}x (median; fastest rounds {r['measured']:.2f}x)")
            lines.append(f"latency plan {i}: {r['rewritten']} layers, planned {planned}, measured "
                         f"{measured} (noise +-{r['noise']:.2f})" + (" <- kept" if r.get("kept") else ""))
        lines += [f"note: {n}" for n in self.notes]
        return lines

    def table(self) -> str:
        """Plain-text table for the terminal (before/after per layer, totals last)."""
        head, rows = self._rows()
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        if not rows:
            out.append("(no convolution or linear layer found)")
        return "\n".join(out + [""] + self._summary_lines())

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown: a summary list and a per-layer table."""
        head, rows = self._rows()
        lines = ["# dsrewrite report", ""] + [f"- {s}" for s in self._summary_lines()] + [""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.table()


def flops_known(layer: LayerReport) -> bool:
    """Whether the layer's FLOPs are known: the cost model gives 0 (and ``None`` may come from JSON) when the
    conv's output shape is unknown; a conv that runs has FLOPs > 0."""
    return bool(layer.flops_before)


def _unknown_flops_to_default(item: Dict[str, Any], fields: Dict[str, "dataclasses.Field"]) -> Dict[str, Any]:
    """JSON ``null`` FLOPs (unknown) back to the dataclass default, the in-memory convention."""
    for key in ("flops_before", "flops_after"):
        if key in item and item[key] is None and key in fields:
            item[key] = fields[key].default
    return item


def _by_kind(layers: List[LayerReport]) -> str:
    """`` (12 kxk, 30 linear)`` when more than one layer kind is among ``layers``."""
    counts: Dict[str, int] = {}
    for L in layers:
        counts[L.kind] = counts.get(L.kind, 0) + 1
    return "" if len(counts) < 2 else " (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")"


def _ratio(after, before) -> Optional[float]:
    return after / before if before else None


def _num(n: Optional[float]) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def build_report(layers: List[LayerReport], *, model: str, route: str, input_shapes: List[List[Any]],
                 params_before: int, flops_before: int, params_after: Optional[int] = None,
                 flops_after: Optional[int] = None, flops_per_sample: bool = False,
                 flops_partial: Optional[str] = None, notes: Optional[List[str]] = None) -> Report:
    """The one way every route makes its report from the plan's layer entries.

    Whole-model totals after the rewrite are those counted on the rewritten model where the route counts them
    (``params_after`` / ``flops_after``), otherwise the original's minus the rewritten layers' savings (the
    per-layer numbers come from the one cost model). ``flops_partial``: the totals leave out ops of unknown shape,
    said on the FLOPs line (e.g. ``"7 of 9 convs counted; give input_shapes / --input-shape"``). The outcome notes
    are added last.
    """
    done = [L for L in layers if L.rewritten]
    if params_after is None:
        params_after = params_before - sum(L.params_before - L.params_after for L in done)
    if flops_after is None:
        flops_after = flops_before - sum(L.flops_before - L.flops_after for L in done)
    report = Report(layers=list(layers), model=model, route=route, input_shapes=input_shapes,
                    params_before=params_before, params_after=params_after, flops_before=flops_before,
                    flops_after=flops_after, flops_per_sample=flops_per_sample, flops_partial=flops_partial,
                    notes=list(notes or []))
    report.add_outcome_notes()
    return report

