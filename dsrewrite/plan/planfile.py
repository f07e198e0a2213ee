"""A rewrite you can keep: :class:`Plan` (what was decided for every layer, as a versioned JSON file) and
:func:`dsrewrite.apply_plan` / :func:`dsrewrite.onnx.apply_plan` (rebuild exactly that rewrite on a fresh copy of
the model, without timing anything).

A plan lists every layer the frontend found (rewritten or left alone, with the reason), per layer its kind,
rank, per-channel ranks (ragged) and depthwise form (``gather_input``), plus the options, runtime, memory format
and versions it was made with, and a fingerprint of the model (its layer names and weight shapes) so a plan is
never applied to a model it was not made for. A route replays a plan through the shared planner:
``pipeline.plan_sites(sites, replay=plan)`` decides every site as the plan says (no budget, no timer), and
:meth:`Plan.fit_error` names the first layer that does not fit.

Why: latency plans depend on the machine and the moment they were timed, calibrated and ragged plans on data;
after fine-tuning, the weights live in a ``state_dict`` only a model rebuilt with the same plan can load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import DsrewriteError, first_line
from ..version import __version__

__all__ = ["Plan", "LayerPlan", "fingerprint", "weight_shape", "PLAN_VERSION", "PLAN_FORMAT"]

PLAN_FORMAT = "dsrewrite.plan"  # the "format" field of a plan file
PLAN_VERSION = 1  # bumped when a field changes meaning; older files are read, newer ones refused


@dataclass
class LayerPlan:
    """One layer of a plan: ``rank`` (``None``: left alone, ``reason`` says why), ``channel_ranks`` (ragged:
    depthwise filters per input channel; ``None`` for uniform ranks), ``gather_input`` (the depthwise form), and
    the layer's shape for the fingerprint (``weight_shape``: the effective weight's, ``None`` when not constant)."""

    name: str
    kind: str
    rank: Optional[int] = None
    channel_ranks: Optional[List[int]] = None
    gather_input: bool = False
    in_channels: int = 0
    out_channels: int = 0
    kernel: List[int] = field(default_factory=list)
    weight_shape: Optional[List[int]] = None
    reason: Optional[str] = None

    @property
    def rewritten(self) -> bool:
        return self.rank is not None


def fingerprint(layers: Iterable[Tuple[str, Optional[Sequence[int]]]]) -> str:
    """A short hash of a model's layers: the sorted ``(name, weight shape)`` pairs of every layer a frontend
    found (16 hex digits of their SHA-256)."""
    pairs = sorted([str(n), None if s is None else [int(d) for d in s]] for n, s in layers)
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()[:16]


def weight_shape(t: Any) -> Optional[List[int]]:
    """A weight's shape as a plan's fingerprint lists it (``None`` when the weight is not constant)."""
    return None if t is None else [int(d) for d in t.shape]


def _jsonable(v: Any) -> Any:
    """An option value as JSON: mappings and sequences kept, a callable or an object as its description."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if callable(v):
        return f"<callable {getattr(v, '__name__', type(v).__name__)}>"
    return str(v)


def _options(cfg) -> Dict[str, Any]:
    """The options a plan was made with (``RewriteConfig.given()``), data left out: calibration as given or not."""
    given = dict(cfg.given()) if cfg is not None else {}
    calibrated = given.pop("calibration", None) is not None
    out = {k: _jsonable(v) for k, v in given.items()}
    out["calibration"] = calibrated
    return out


@dataclass
class Plan:
    """What a rewrite decided, per layer, and what it was made with; ``save`` / ``load`` as JSON.

    ``layers``: every layer found, in the frontend's order; ``route``: the route that built it (``"fx"``,
    ``"fx-submodules+module-swap"``, ``"onnx"``...); ``options``: the non-default options (calibration as
    given or not); ``runtime`` / ``memory_format``: what it was timed in (``None``: not timed);
    ``versions``: of dsrewrite and torch; ``fingerprint``: :func:`fingerprint` of the model's layers.
    """

    layers: List[LayerPlan]
    route: str
    options: Dict[str, Any] = field(default_factory=dict)
    runtime: Optional[str] = None
    memory_format: Optional[str] = None
    versions: Dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.model_layers())

    # ------------------------------------------------------------------ reading
    def model_layers(self) -> List[Tuple[str, Optional[List[int]]]]:
        """The fingerprint's list: ``(name, weight shape)`` of every layer, sorted by name."""
        return sorted((L.name, L.weight_shape) for L in self.layers)

    def by_name(self) -> Dict[str, LayerPlan]:
        return {L.name: L for L in self.layers}

    @property
    def ranks(self) -> Dict[str, Optional[int]]:
        """``{layer: rank}`` (``None``: left alone), in the plan's order."""
        return {L.name: L.rank for L in self.layers}

    def fit_error(self, layers: Iterable[Tuple[str, Optional[Sequence[int]]]]) -> Optional[str]:
        """``None`` when a model's ``(name, weight shape)`` layers are the plan's, else the first mismatch in
        words (a plan layer missing, another weight shape, a layer the plan does not know)."""
        found = {n: (None if s is None else [int(d) for d in s]) for n, s in layers}
        for L in self.layers:
            if L.name not in found:
                return f"layer {L.name!r} of the plan is not in the model"
            if found[L.name] != L.weight_shape:
                return (f"layer {L.name!r} has weight shape {found[L.name]} in the model, {L.weight_shape} in the "
                        "plan")
        known = self.by_name()
        extra = next((n for n in found if n not in known), None)
        if extra is not None:
            return f"the model's layer {extra!r} is not in the plan"
        return None

    def check_fit(self, layers: Iterable[Tuple[str, Optional[Sequence[int]]]]) -> None:
        """Refuse (one line, naming the first mismatch) a model the plan was not made for."""
        why = self.fit_error(layers)
        if why is not None:
            raise DsrewriteError(f"the plan does not fit this model (made for {self.fingerprint}): {why}")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_decisions(cls, decisions: Sequence[Any], *, route: str, config: Any = None,
                       runtime: Optional[str] = None, memory_format: Optional[str] = None) -> "Plan":
        """The plan of a finished rewrite: its decisions (``pipeline.Decision``) as built, so per-channel ranks
        are read from the installed pair when a torch backend recorded one (calibration may have moved them)."""
        layers = []
        for d in decisions:
            spec, rep = d.site.spec, d.report
            counts = None
            if d.factors is not None:
                index = getattr(d.module, "channel_index", None) if d.module is not None else None
                if index is not None:
                    counts = [int(c) for c in torch.bincount(index.detach().cpu(), minlength=spec.in_channels)]
                elif d.factors.channel_ranks is not None:
                    counts = [int(c) for c in d.factors.channel_ranks]
            layers.append(LayerPlan(
                name=spec.name, kind=spec.kind, rank=int(d.factors.rank) if d.factors is not None else None,
                channel_ranks=counts, gather_input=bool(d.gather_input) if d.factors is not None else False,
                in_channels=int(spec.in_channels), out_channels=int(spec.out_channels),
                kernel=[int(k) for k in spec.kernel], weight_shape=weight_shape(d.site.weight),
                reason=None if d.factors is not None else rep.reason))
        return cls(layers, route, _options(config), runtime, memory_format, _versions())

    # ------------------------------------------------------------------ files
    def to_dict(self) -> Dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": self.version, "route": self.route, "runtime": self.runtime,
                "memory_format": self.memory_format, "options": self.options, "versions": self.versions,
                "fingerprint": {"hash": self.fingerprint, "layers": [list(p) for p in self.model_layers()]},
                "layers": [dataclasses.asdict(L) for L in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: "os.PathLike[str] | str") -> None:
        """Write the plan as readable JSON to ``path``."""
        try:
            with open(path, "w") as f:
                f.write(self.to_json() + "\n")
        except OSError as e:
            raise DsrewriteError(f"cannot write the plan to {os.fspath(path)}: {first_line(e)}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan") -> "Plan":
        """A plan from its JSON form; a malformed or newer one is refused in one line."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise DsrewriteError(f"{where} is not a dsrewrite plan (no \"format\": \"{PLAN_FORMAT}\")")
        version = data.get("version")
        if not isinstance(version, int) or version < 1:
            raise DsrewriteError(f"{where}: bad plan version {version!r}")
        if version > PLAN_VERSION:
            raise DsrewriteError(f"{where} is a version {version} plan; this dsrewrite reads up to version "
                                 f"{PLAN_VERSION}: upgrade dsrewrite")
        names = {f.name for f in dataclasses.fields(LayerPlan)}
        layers = []
        raw = data.get("layers")
        if not isinstance(raw, list):
            raise DsrewriteError(f"{where}: \"layers\" must be a list")
        for i, L in enumerate(raw):
            if not isinstance(L, Mapping) or not isinstance(L.get("name"), str) or not isinstance(L.get("kind"), str):
                raise DsrewriteError(f"{where}: layer {i} needs a \"name\" and a \"kind\"")
            layer = LayerPlan(**{k: v for k, v in L.items() if k in names})
            _check_layer(layer, where)
            layers.append(layer)
        fp = data.get("fingerprint") or {}
        plan = cls(layers, str(data.get("route") or ""), dict(data.get("options") or {}), data.get("runtime"),
                   data.get("memory_format"), dict(data.get("versions") or {}), "", version)
        given = fp.get("hash") if isinstance(fp, Mapping) else None
        if given and given != plan.fingerprint:
            raise DsrewriteError(f"{where}: its fingerprint {given} does not match its layers ({plan.fingerprint}): "
                                 "a layer's name or weight shape was edited")
        return plan

    @classmethod
    def load(cls, path: "os.PathLike[str] | str") -> "Plan":
        """Read a plan written by :meth:`save`."""
        p = os.fspath(path)
        if not os.path.isfile(p):
            raise DsrewriteError(f"plan file not found: {p}")
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise DsrewriteError(f"cannot read the plan {p}: {first_line(e)}") from None
        return cls.from_dict(data, where=f"plan {p}")


def _check_layer(L: LayerPlan, where: str) -> None:
    """One-line refusal of a layer entry that no rewrite could have made (an edited file)."""
    bad = None
    if L.rank is not None and (isinstance(L.rank, bool) or not isinstance(L.rank, int) or L.rank < 1):
        bad = f"rank must be a positive int or null, got {L.rank!r}"
    elif L.channel_ranks is not None:
        ok = isinstance(L.channel_ranks, list) and all(isinstance(c, int) and c >= 0 for c in L.channel_ranks)
        if not ok or L.rank is None or len(L.channel_ranks) != L.in_channels \
                or sum(L.channel_ranks) != L.in_channels * L.rank:
            bad = (f"channel_ranks must be {L.in_channels} counts summing to in_channels * rank "
                   f"({L.in_channels} * {L.rank})")
    elif L.weight_shape is not None and not (isinstance(L.weight_shape, list)
                                             and all(isinstance(d, int) for d in L.weight_shape)):
        bad = f"weight_shape must be a list of ints, got {L.weight_shape!r}"
    if bad:
        raise DsrewriteError(f"{where}: layer {L.name!r}: {bad}")
    L.gather_input = bool(L.gather_input)
    L.kernel = list(L.kernel or [])


def _versions() -> Dict[str, str]:
    return {"dsrewrite": __version__, "torch": torch.__version__}
