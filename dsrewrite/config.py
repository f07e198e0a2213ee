"""``RewriteConfig``: every option of a rewrite in one frozen, validated object, shared by every route.

``dsrewrite.rewrite``, ``dsrewrite.onnx.rewrite``, the ``torch.compile`` backend's ``options=`` and the CLI all
build one (keyword arguments are a convenience that builds it), so an option means the same thing and is
checked the same way everywhere. Validation lives here and raises one-line :class:`DsrewriteError`; each
route says which options it cannot honour (:data:`ROUTE_UNSUPPORTED`) and refuses them by name.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .errors import DsrewriteError
from .timing.layers import MEMORY_FORMATS
from .modules import BACKENDS
from .ir import check_kinds
from .plan.planner import BUDGET_ARGS, matcher, one_budget
from .plan.policy import RankArg, RankMap, check_rank, plan_kinds
from .timing.runtimes import RUNTIMES

__all__ = ["RewriteConfig", "ROUTE_UNSUPPORTED", "COMPILERS"]

COMPILERS = ("inductor", "eager")  # torch.compile backend: "eager" runs the rewritten graph without Inductor

_LATENCY_ONLY = "it only serves target_latency, which the backend does not support"
_LATENCY_ONLY_PASS = "it only serves target_latency, which the pass alone does not support"
_ORT_OPTIONS = ("ort_threads", "ort_optimization", "ort_provider")
ORT_OPTIMIZATIONS = ("disable", "basic", "extended", "all")  # onnxruntime graph optimisation levels
# options a route cannot honour, with the reason given when one is set (a value other than the default)
ROUTE_UNSUPPORTED: Dict[str, Dict[str, str]] = {
    "torch": {
        "input_shapes": "example inputs give the shapes on the PyTorch route",
        "overwrite": "the PyTorch route writes no file",
        "compiler": "it is an option of the torch.compile backend",
        "mode": "it is an option of the torch.compile backend",
        "sequential": "the PyTorch route always calibrates in execution order on the rewritten model",
    },
    "onnx": {
        "device": "the ONNX route times layers in onnxruntime on the CPU",
        "memory_format": "onnxruntime chooses its own layouts for an NCHW ONNX graph",
        "latency_cache": "the ONNX route caches its onnxruntime layer timings in the process only",
        "inplace": "the source model is never changed: the result is a new model",
        "backend": "the ONNX model runs in the user's runtime",
        "compiler": "it is an option of the torch.compile backend",
        "mode": "it is an option of the torch.compile backend",
    },
    "fx pass": {
        "calibration": "the pass plans from the weights alone: calibrate with dsrewrite.rewrite(model, x, calibration=...)",
        "target_latency": "the pass cannot time the whole model: use dsrewrite.rewrite(model, x, target_latency=...)",
        "measure_time": "the pass times nothing: dsrewrite.rewrite times the models",
        "inplace": "the pass always rewrites the GraphModule it is given",
        "device": _LATENCY_ONLY_PASS,
        "memory_format": _LATENCY_ONLY_PASS,
        "latency_cache": _LATENCY_ONLY_PASS,
        "runtime": _LATENCY_ONLY_PASS,
        "ort_threads": _LATENCY_ONLY_PASS,
        "ort_optimization": _LATENCY_ONLY_PASS,
        "ort_provider": _LATENCY_ONLY_PASS,
        "sequential": "the pass does not calibrate",
        "int8_friendly": "the scales are balanced after the rewrite: use dsrewrite.rewrite(model, x, int8_friendly=True)",
        "input_shapes": "the example inputs give the shapes",
        "overwrite": "the pass writes no file",
        "compiler": "it is an option of the torch.compile backend",
        "mode": "it is an option of the torch.compile backend",
    },
    "torch.compile": {
        "target_latency": "the backend sees one graph at a time and cannot time the whole model: give rank, "
                          "target_flops or target_params, or plan with dsrewrite.rewrite(model, x, "
                          "target_latency=..., runtime='inductor') and compile the model it returns",
        "runtime": "the backend's graphs always run under torch.compile",
        "device": _LATENCY_ONLY,
        "memory_format": _LATENCY_ONLY,
        "latency_cache": _LATENCY_ONLY,
        "inplace": "the backend never changes the model: the rewrite lives in the compiled graph",
        "measure_time": "time the compiled model itself (benchmarks/compile.py does)",
        "input_shapes": "Dynamo passes the example inputs",
        "overwrite": "the backend writes no file",
        "ort_threads": "it sets the onnxruntime sessions models are timed in (runtime='onnxruntime')",
        "ort_optimization": "it sets the onnxruntime sessions models are timed in (runtime='onnxruntime')",
        "ort_provider": "it sets the onnxruntime sessions models are timed in (runtime='onnxruntime')",
        "sequential": "the backend always calibrates in execution order on the rewritten graph",
        "int8_friendly": "the backend's graphs are not quantized: rewrite with dsrewrite.rewrite(..., "
                         "int8_friendly=True) and quantize the model it returns",
    },
}
_CLI_WORDS = {"torch": "PyTorch", "onnx": "ONNX", "torch.compile": "torch.compile", "fx pass": "the fx pass"}
_ROUTE_WORDS = {"torch": "the PyTorch route", "onnx": "the ONNX route", "torch.compile": "the torch.compile backend",
                "fx pass": "SeparableRewritePass"}


@dataclass(frozen=True)
class RewriteConfig:
    """What to rewrite and how. Every field has the default a route uses when it is not given.

    Selection: ``rank`` (int, ``"auto"``, ``"full"``, or a mapping ``{glob: rank}``: ranks by layer, first match
    wins, layers matched by none left alone), ``include`` / ``exclude`` (globs or a callable).
    Budgets (at most one, instead of ``rank``): ``target_flops``, ``target_params``, ``target_latency`` (fractions
    of the whole model), ``energy`` (per layer), or ``budget=(name, fraction)`` for any kind registered with
    :func:`dsrewrite.plan.cost_providers.register_budget`. ``kinds``: the layer kinds to rewrite (``"kxk"`` convs as separable
    pairs, ``"pointwise"`` 1x1 convs and ``"linear"`` layers as low-rank pairs, or ``"all"``; ``None``: all of them
    under a budget, ``"kxk"`` for a ``rank``, see :func:`dsrewrite.plan.policy.default_kinds`). ``strict``: refuse a
    ``target_latency`` that is not met instead of keeping the fastest plan measured faster than the original (best
    effort, the default). ``ragged``: per-channel ranks. ``calibration``: data for
    data-aware initialisation (every route; on the ONNX route computed in onnxruntime, ``sequential``
    choosing between the rewritten graph's activations, in execution order, and the original model's; ``None``:
    sequential when it fits in time). ``runtime``: what the model is timed in, for latency planning and
    the report (``"eager"``, ``"inductor"``, ``"onnxruntime"``; ``None``: the route's own, eager for PyTorch models
    and onnxruntime for ONNX ones). Latency planning: ``device``, ``memory_format``, ``latency_cache``.
    Output: ``backend`` (how pairs run), ``inplace``, ``measure_time`` (``None``: the route's default),
    ``progress``, ``name``. ONNX: ``input_shapes``, ``overwrite``, and the onnxruntime sessions it times in
    (``ort_threads``, ``ort_optimization``, ``ort_provider``; also for ``runtime="onnxruntime"`` on the
    PyTorch route). torch.compile: ``compiler``, ``mode``. ``int8_friendly``: rescale each pair's filters and
    columns to equal ranges for int8 quantization, the float model unchanged in value (:mod:`dsrewrite.plan.balance`).
    """

    rank: RankArg = "auto"
    include: Any = None
    exclude: Any = None
    target_flops: Optional[float] = None
    target_params: Optional[float] = None
    target_latency: Optional[float] = None
    energy: Optional[float] = None
    budget: Optional[Tuple[str, float]] = None
    kinds: Any = None
    strict: bool = False
    ragged: bool = False
    calibration: Any = field(default=None, compare=False)
    sequential: Optional[bool] = None
    device: Any = None
    memory_format: str = "auto"
    runtime: Optional[str] = None
    latency_cache: Optional[str] = None
    backend: str = "auto"
    inplace: bool = False
    measure_time: Optional[bool] = None
    progress: bool = False
    name: Optional[str] = None
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None
    overwrite: bool = False
    compiler: str = "inductor"
    mode: Optional[str] = None
    ort_threads: Optional[int] = None
    ort_optimization: str = "all"
    ort_provider: str = "CPUExecutionProvider"
    int8_friendly: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", check_rank(self.rank))
        if self.backend not in BACKENDS:
            raise DsrewriteError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise DsrewriteError(f"memory_format must be 'auto', 'contiguous' or 'channels_last', got {self.memory_format!r}")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise DsrewriteError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.ort_threads is not None and (isinstance(self.ort_threads, bool) or not isinstance(self.ort_threads, int)
                                             or self.ort_threads < 1):
            raise DsrewriteError(f"ort_threads must be an int >= 1, got {self.ort_threads!r}")
        if self.ort_optimization not in ORT_OPTIMIZATIONS:
            raise DsrewriteError(f"ort_optimization must be one of {', '.join(ORT_OPTIMIZATIONS)}, got "
                                 f"{self.ort_optimization!r}")
        if not isinstance(self.ort_provider, str) or not self.ort_provider:
            raise DsrewriteError(f"ort_provider must be an onnxruntime execution provider name, got {self.ort_provider!r}")
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise DsrewriteError(f"sequential must be True, False or None, got {self.sequential!r}")
        if self.sequential is not None and self.calibration is None:
            raise DsrewriteError("sequential applies to calibration: give calibration data too")
        if not isinstance(self.int8_friendly, bool):
            raise DsrewriteError(f"int8_friendly must be True or False, got {self.int8_friendly!r}")
        if self.compiler not in COMPILERS:
            raise DsrewriteError(f"compiler must be one of {', '.join(COMPILERS)}, got {self.compiler!r}")
        given = [(k, getattr(self, k)) for k in BUDGET_ARGS if getattr(self, k) is not None]
        if self.budget is not None:
            if not (isinstance(self.budget, (tuple, list)) and len(self.budget) == 2 and isinstance(self.budget[0], str)):
                raise DsrewriteError(f"budget must be a (name, fraction) pair, got {self.budget!r}")
            given.append(tuple(self.budget))
        chosen = one_budget(self.rank, given, timer=True)
        if chosen is not None:  # fractions normalised to float
            object.__setattr__(self, "budget" if self.budget is not None else chosen[0],
                               chosen if self.budget is not None else chosen[1])
        matcher(self.include, "include")
        matcher(self.exclude, "exclude")
        if self.kinds is not None:
            object.__setattr__(self, "kinds", check_kinds(self.kinds))

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, config: Optional["RewriteConfig"] = None, options: Optional[Mapping[str, Any]] = None,
              *, route: Optional[str] = None, words: str = "") -> "RewriteConfig":
        """``config`` (or the defaults) with ``options`` (keyword arguments) applied on top, checked for ``route``.

        Unknown option names are refused by name, with the list of valid ones (``words`` names the caller).
        """
        if config is not None and not isinstance(config, RewriteConfig):
            raise DsrewriteError(f"config must be a dsrewrite.RewriteConfig, got {type(config).__name__}")
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unsupported = ROUTE_UNSUPPORTED.get(route or "", {})
        for key in options:
            if key not in names:
                valid = ", ".join(n for n in sorted(names) if n not in unsupported)
                raise DsrewriteError(f"unknown option {key!r}{words} (options: {valid})")
        cfg = dataclasses.replace(config, **options) if config is not None else cls(**options)
        if route is not None:
            cfg.check_route(route)
        return cfg

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "RewriteConfig":
        """The config of ``dsrewrite rewrite`` arguments (flags that do not apply to a route are checked there)."""
        get = lambda k, d=None: getattr(args, k, d)  # noqa: E731
        return cls(rank=get("rank", "auto"), include=get("include") or None, exclude=get("exclude") or None,
                   target_flops=get("target_flops"), target_params=get("target_params"),
                   target_latency=get("target_latency"), energy=get("energy"), ragged=bool(get("ragged", False)),
                   kinds=get("kinds") or None, strict=bool(get("strict", False)),
                   calibration=get("calibration"), sequential=get("sequential"), device=get("device"),
                   latency_cache=get("latency_cache"),
                   runtime=get("runtime") or ("onnxruntime" if str(get("out") or "").lower().endswith(".onnx")
                                              and not str(get("src") or "").lower().endswith(".onnx") else None),
                   backend=get("backend", "auto") or "auto", measure_time=not get("no_time", False),
                   progress=not get("quiet", False), overwrite=bool(get("overwrite", False)),
                   ort_threads=get("ort_threads"), ort_optimization=get("ort_optimization") or "all",
                   ort_provider=get("ort_provider") or "CPUExecutionProvider",
                   int8_friendly=bool(get("int8_friendly", False)))

    # ------------------------------------------------------------------ reading
    def given(self) -> Dict[str, Any]:
        """The options set to something other than their default."""
        def is_default(v: Any, default: Any) -> bool:  # data (arrays, tensors) is never a default value
            return isinstance(v, (str, int, float, bool, tuple)) and v == default

        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None and not is_default(getattr(self, f.name), f.default)}

    def check_route(self, route: str, *, cli: bool = False) -> None:
        """Refuse, by name and with the reason, an option that ``route`` cannot honour (``cli``: name the flag)."""
        unsupported = dict(ROUTE_UNSUPPORTED[route])
        runtime = self.runtime
        if route == "onnx" and runtime not in (None, "onnxruntime"):
            unsupported["runtime"] = "an ONNX model is timed and deployed in onnxruntime"
        if route == "torch" and runtime != "onnxruntime":
            unsupported.update({k: "it sets the onnxruntime sessions models are timed in: give runtime='onnxruntime' "
                                   "(CLI: --runtime onnxruntime, the default for an .onnx output)" for k in _ORT_OPTIONS})
        if route == "torch" and runtime == "onnxruntime":
            unsupported.update(memory_format="onnxruntime chooses its own layouts for an NCHW ONNX graph",
                               device="runtime='onnxruntime' times the exported model on the CPU")
        if route != "onnx" and self.sequential:  # what the torch routes always do
            unsupported.pop("sequential", None)
        for key in self.given():
            if key in unsupported:
                if cli:
                    flag = "no-sequential" if key == "sequential" and self.sequential is False else key.replace("_", "-")
                    raise DsrewriteError(f"--{flag} is not supported for {_CLI_WORDS[route]} models: "
                                         f"{unsupported[key]}")
                raise DsrewriteError(f"option {key!r} is not supported by {_ROUTE_WORDS[route]}: {unsupported[key]}")

    def chosen_budget(self) -> Optional[Tuple[str, float]]:
        """``(name, fraction)`` of the one budget given (a keyword or ``budget``), or ``None``."""
        if self.budget is not None:
            return tuple(self.budget)
        for key in ("target_flops", "target_params", "target_latency", "energy"):
            if getattr(self, key) is not None:
                return key, getattr(self, key)
        return None

    def layer_kinds(self) -> Tuple[str, ...]:
        """The layer kinds this plan rewrites: ``kinds``, or the default for a budget or a rank."""
        return plan_kinds(self.kinds, self.chosen_budget() is not None, isinstance(self.rank, RankMap))

    def plan_key(self) -> Tuple[tuple, list]:
        """What decides ranks and factors, hashable (plans are cached on it); objects compared by identity and
        returned in the list, to be kept alive with the plan."""
        keep: list = []

        def freeze(v: Any) -> Any:
            if v is None or isinstance(v, (str, int, float, bool)):
                return v
            if isinstance(v, RankMap):  # ranks by layer: the ordered (glob, rank) pairs
                return ("rank map",) + tuple(v.items())
            if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
                return tuple(v)
            keep.append(v)
            return ("id", id(v))

        names = ("rank", "include", "exclude", "backend", "target_flops", "target_params", "energy", "budget",
                 "calibration", "sequential", "ragged", "kinds", "strict", "int8_friendly")
        return tuple((k, freeze(getattr(self, k))) for k in names), keep
