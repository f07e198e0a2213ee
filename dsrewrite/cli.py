"""Command line: ``dsrewrite rewrite``, ``dsrewrite report``, ``dsrewrite demo``.

Bad input prints one line ``dsrewrite: error: ...`` and exits 2, never a traceback (``--debug``, before or
after the command, shows one); option values and argparse's own errors too, without the usage (printed for
``--help`` and for no arguments, or a command alone). ``rewrite -q`` prints nothing but errors: third-party
warnings and logs (Python ``warnings`` and ``logging``, onnx-graphsurgeon's logger, onnxruntime's) are
silenced too.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import re
import sys
import warnings
from typing import Dict, Iterator, NoReturn, Optional, Sequence, Tuple

import torch

from .api import apply_plan, rewrite
from .calib.images import CALIB_FLAGS, image_options, load_images, load_tensors
from .config import RewriteConfig
from .demo import run_demo
from .errors import DsrewriteError, first_line
from .ir import check_kinds
from .plan.policy import check_rank
from .report import Report
from .timing.layers import to_format
from .timing.runtimes import export_onnx

__all__ = ["main", "load_model", "build_parser"]

DETECTION_HINT = "torchvision.models.detection"


def _ints(text: str) -> Tuple[Tuple[int, ...], Optional[str]]:
    """``1,3,224,224`` or ``1x3x224x224`` read strictly: positive integers, one kind of separator, no empty item;
    returns the integers, or ``()`` and what is wrong."""
    items = [item.strip() for item in text.split("," if "," in text else "x")]
    bad = next((item for item in items if not re.fullmatch(r"[0-9]+", item) or int(item) == 0), None)
    if bad is not None:
        return (), "an empty item" if not bad else f"{bad!r} is not a positive integer"
    return tuple(int(item) for item in items), None


def _parse_input_shape(text: str) -> Tuple[Optional[str], Tuple[int, ...]]:
    """``1,3,224,224`` (the model's one input) or ``NAME=1x3x224x224`` (an ONNX input by name)."""
    name, sep, dims = text.rpartition("=")
    shape, wrong = _ints(dims)
    if wrong:
        raise argparse.ArgumentTypeError(f"a shape is positive integers separated by commas like 1,3,224,224 "
                                         f"(or x: 1x3x224x224; NAME=SHAPE for a named input), got {text!r} ({wrong})")
    return (name.strip() or None) if sep else None, shape


def _parse_rank(text: str):
    """``4``, ``auto``, ``full``, or ranks by layer ``layer4.*=2,*=auto`` (GLOB=RANK items, first match wins)."""
    try:
        if "=" not in text:
            try:
                return check_rank(text)
            except DsrewriteError as e:
                raise DsrewriteError(f"{e} (ranks by layer: GLOB=RANK items like 'layer4.*=2,*=auto')") from None
        mapping = {}
        for item in text.split(","):
            glob, sep, value = item.strip().rpartition("=")
            if not sep or not glob.strip() or not value.strip():
                raise DsrewriteError(f"--rank takes RANK or GLOB=RANK items separated by commas like "
                                     f"'layer4.*=2,*=auto', got item {item.strip()!r}")
            mapping.setdefault(glob.strip(), value.strip())
        return check_rank(mapping)
    except DsrewriteError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_model(src: str, weights: Optional[str] = None):
    """Build a model from ``torchvision:NAME`` or ``package.module:factory`` (weights=None unless a file is given)."""
    if ":" not in src:
        raise DsrewriteError(f"model source must be torchvision:NAME, package.module:factory or a .onnx file, got {src!r}")
    mod_name, _, attr = src.partition(":")
    if mod_name == "torchvision":
        try:
            import torchvision  # optional dependency (the vision extra): only torchvision:NAME sources need it
        except ImportError:
            raise DsrewriteError("torchvision is not installed (pip install torchvision)") from None
        names = torchvision.models.list_models()
        if attr not in names:
            close = difflib.get_close_matches(attr, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise DsrewriteError(f"unknown torchvision model {attr!r}{hint}")
        model = torchvision.models.get_model(attr, weights=None)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # like `python -m`: the current folder imports
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise DsrewriteError(f"cannot import {mod_name!r}: {e}") from None
        factory = getattr(module, attr, None)
        if factory is None:
            raise DsrewriteError(f"{mod_name!r} has no attribute {attr!r}")
        model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise DsrewriteError(f"{src} did not give a torch.nn.Module (got {type(model).__name__})")
    if weights:
        if not os.path.exists(weights):
            raise DsrewriteError(f"weights file not found: {weights}")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"cannot load weights from {weights}: {first_line(e)}") from None
    return model.eval()


def _single_shape(given) -> Optional[Tuple[int, ...]]:
    """The one unnamed ``--input-shape`` a torch model takes."""
    if not given:
        return None
    if len(given) > 1 or given[0][0] is not None:
        raise DsrewriteError("a torch model takes one --input-shape, without a name (NAME=SHAPE is for ONNX inputs)")
    return given[0][1]


def _example_inputs(model, shape: Optional[Tuple[int, ...]]) -> tuple:
    detection = type(model).__module__.startswith(DETECTION_HINT)
    if detection:
        shape = shape or (3, 320, 320)
        img_shape = shape[-3:]
        return ([torch.rand(*img_shape)],)
    shape = shape or (1, 3, 224, 224)
    return (torch.randn(*shape),)


def _export_onnx(model, args: tuple, out: str, quiet: bool) -> None:
    """ONNX with a dynamic batch axis where the model allows it (:func:`dsrewrite.timing.runtimes.export_onnx`); when it
    has the example's fixed shapes instead, a note on stderr says why."""
    reason = export_onnx(model, args, out, verbose=not quiet)
    if reason and not quiet:
        print(f"note: {out} has the example's fixed input shape (no dynamic batch axis: {reason})", file=sys.stderr)


def _save(model, args: tuple, out: str, quiet: bool = False) -> None:
    ext = os.path.splitext(out)[1].lower()
    try:
        if ext == ".pt2":
            ep = torch.export.export(model, args)
            torch.export.save(ep, out)
        elif ext == ".onnx":
            _export_onnx(model, args, out, quiet)
        elif ext in (".pt", ".pth"):
            torch.save(model, out)
        else:
            raise DsrewriteError(f"output must end in .pt2 (torch.export), .onnx or .pt, got {out!r}")
    except DsrewriteError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DsrewriteError(f"cannot export the rewritten model to {out}: {first_line(e, 200)}") from None


def _cmd_rewrite(a: argparse.Namespace) -> int:
    if not getattr(a, "calibration", None):
        given = [flag for flag, key, default in CALIB_FLAGS if getattr(a, key, default) != default]
        if given:
            raise DsrewriteError(f"{given[0]} applies to calibration: give --calibration too")
    # fail before the work, not after it
    for path in (a.out, a.report, getattr(a, "markdown", None), getattr(a, "save_plan", None)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise DsrewriteError(f"output folder does not exist: {folder}")
    plan_flags = [flag for flag, given in (("--plan", getattr(a, "plan", None)),
                                           ("--save-plan", getattr(a, "save_plan", None))) if given]
    if getattr(a, "plan", None):
        _check_replay_flags(a)
    if a.src.lower().endswith(".onnx"):
        from . import onnx as ds_onnx  # optional dependency (the onnx extra): only .onnx sources need the ONNX route

        if plan_flags and not hasattr(ds_onnx, "apply_plan"):
            raise DsrewriteError(f"{plan_flags[0]} is not supported yet for ONNX models")

        report = ds_onnx.cli_rewrite(a)
        _emit_report(report, a)
        if not a.quiet:
            print(f"wrote {a.out}")
        return 0
    if a.out and os.path.splitext(a.out)[1].lower() not in (".pt2", ".onnx", ".pt", ".pth"):
        raise DsrewriteError(f"output must end in .pt2 (torch.export), .onnx or .pt, got {a.out!r}")
    model = load_model(a.src, a.weights)
    args = _example_inputs(model, _single_shape(a.input_shape))
    if getattr(a, "calib_layout", "nchw") != "nchw":
        raise DsrewriteError("--calib-layout nhwc is for ONNX models: a PyTorch image model takes NCHW")
    calibration = load_calibration(a.calibration, args, **image_options(a)) if getattr(a, "calibration", None) else None
    if getattr(a, "plan", None):  # replay a saved plan: no layer timed, the plan's ranks
        result = apply_plan(model, a.plan, args, calibration, name=a.src, backend=a.backend or "auto",
                            progress=not a.quiet)
    else:
        cfg = RewriteConfig.from_cli(a)
        cfg.check_route("torch", cli=True)
        result = rewrite(model, args, cfg, name=a.src, calibration=calibration)
    if getattr(a, "save_plan", None):
        result.plan.save(a.save_plan)
    if a.out:
        out_model, out_args = result.model, args
        if result.memory_format == "channels_last" and a.out.lower().endswith(".pt2"):
            out_model, out_args = to_format(result.model, args, "channels_last")
            if not a.quiet:
                print(f"note: {a.out} is exported in channels_last, the layout it was timed in: feed it "
                      f"channels_last inputs", file=sys.stderr)
        _save(out_model, out_args, a.out, quiet=a.quiet)
    _emit_report(result.report, a)
    if a.out and not a.quiet:
        print(f"wrote {a.out}")
    return 0


# flags that choose layers, ranks or how they are timed: a replayed plan (--plan) has decided them
_PLANNING_FLAGS = (("--rank", "rank", "auto"), ("--target-flops", "target_flops", None),
                   ("--target-params", "target_params", None), ("--target-latency", "target_latency", None),
                   ("--energy", "energy", None), ("--kinds", "kinds", None), ("--ragged", "ragged", False),
                   ("--include", "include", None), ("--exclude", "exclude", None), ("--runtime", "runtime", None),
                   ("--device", "device", None), ("--latency-cache", "latency_cache", None),
                   ("--strict", "strict", False))


def _check_replay_flags(a: argparse.Namespace) -> None:
    """``--plan`` with a flag that would plan again: one line naming it."""
    for flag, key, default in _PLANNING_FLAGS:
        if getattr(a, key, default) not in (default, None):
            raise DsrewriteError(f"{flag} cannot be combined with --plan: the plan decides the layers and ranks "
                                 "(and nothing is timed)")


def load_calibration(path: str, args: tuple, max_images: int = 64, *, mean=None, std=None, bgr: bool = False,
                     size: Optional[Tuple[int, int]] = None):
    """Calibration inputs: a ``.pt`` tensor file, or a folder of images (:func:`dsrewrite.calib.images.load_images`:
    resized to the input's H x W or ``size``, scaled to [0, 1], then ``(x - mean) / std`` when given)."""
    if not os.path.exists(path):
        raise DsrewriteError(f"calibration path not found: {path}")
    x0 = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if os.path.isfile(path):
        data = load_tensors(path)
        if not isinstance(data, torch.Tensor):
            raise DsrewriteError(f"calibration file must hold one tensor, got {type(data).__name__}")
        if x0 is not None and tuple(data.shape[1:]) != tuple(x0.shape[1:]):
            raise DsrewriteError(f"calibration tensor has shape {tuple(data.shape)}; the model takes "
                                 f"[N, {', '.join(str(d) for d in x0.shape[1:])}]")
        return data.to(x0.dtype) if x0 is not None else data
    if x0 is None or x0.dim() != 4:
        raise DsrewriteError("an image folder needs a 4-D image input (N, C, H, W); use a .pt tensor file")
    c, h, w = x0.shape[1:]
    arr = load_images(path, size or (h, w), c, mean=mean, std=std, bgr=bgr, max_images=max_images)
    return torch.from_numpy(arr).to(x0.dtype)


def _parse_floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.485,0.456,0.406, got {text!r}") from None


def _parse_size(text: str) -> Tuple[int, int]:
    shape, wrong = _ints(text)
    if wrong or len(shape) != 2:
        raise argparse.ArgumentTypeError(f"expected an image size HxW like 48x320 (two positive integers), got "
                                         f"{text!r}" + (f" ({wrong})" if wrong else ""))
    return shape


def _parse_kinds(text: str) -> tuple:
    """``--kinds kxk,linear`` / ``all``; argparse reports the one-line error."""
    try:
        return check_kinds([t.strip() for t in text.split(",") if t.strip()])
    except DsrewriteError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return v


def _emit_report(report, a: argparse.Namespace) -> None:
    if a.report:
        report.to_json(a.report)
    if getattr(a, "markdown", None):
        with open(a.markdown, "w") as f:
            f.write(report.to_markdown())
    if not a.quiet:
        print(report.table())


def _cmd_report(a: argparse.Namespace) -> int:
    report = Report.from_json(a.path)
    if a.format == "json":
        print(report.to_json())
    elif a.format == "markdown":
        print(report.to_markdown())
    else:
        print(report.table())
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    return run_demo(quick=a.quick)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``dsrewrite: error: ...`` on stderr and exit status 2, without the
    usage (that is for ``--help`` and for a command given no arguments). Commands' parsers are of this class too."""

    commands: Dict[str, argparse.ArgumentParser]  # the top-level parser's commands, by name

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"dsrewrite: error: {' '.join(str(message).splitlines())}\n")


def _model_flags(r: argparse.ArgumentParser) -> None:
    """The model, what to write (model, plan, report) and which layers: ``dsrewrite rewrite``'s own flags."""
    r.add_argument("src", help="torchvision:NAME | package.module:factory | model.onnx")
    r.add_argument("-o", "--out", help="output: .pt2 (torch.export), .onnx (export) or .pt (pickled module)")
    r.add_argument("--rank", type=_parse_rank, default="auto",
                   help="int, 'auto' (default: about half of each layer's FLOPs) or 'full' (exact); or ranks by "
                        "layer, GLOB=RANK items like 'layer4.*=2,*=auto' (first match wins; layers matched by none "
                        "are left alone, and a mapping considers every layer kind)")
    r.add_argument("--save-plan", metavar="PATH", help="write the plan (every layer's rank, per-channel ranks and "
                   "form; options; model fingerprint) as JSON, to rebuild the same rewrite later with --plan")
    r.add_argument("--plan", metavar="PATH", help="rebuild the rewrite a saved plan describes (--save-plan) "
                   "without timing anything; factors by SVD, or refitted with --calibration")
    r.add_argument("--report", help="write the report as JSON to this path")
    r.add_argument("--markdown", help="write the report as Markdown to this path")
    r.add_argument("--input-shape", type=_parse_input_shape, action="append", default=None,
                   help="example input shape, e.g. 1,3,224,224 (default; detection models: 3,320,320); for an ONNX "
                        "model with several inputs, NAME=SHAPE once per input")
    r.add_argument("--weights", help="state_dict file to load before rewriting")
    r.add_argument("--include", action="append", help="only rewrite layers matching this glob (repeatable)")
    r.add_argument("--exclude", action="append", help="never rewrite layers matching this glob (repeatable)")
    r.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="how the separable pairs run (default auto: Triton on CUDA, torch ops otherwise)")
    r.add_argument("--no-time", action="store_true", help="skip the latency measurement")


def _budget_flags(r: argparse.ArgumentParser) -> None:
    """Budgets and how ranks are planned under them."""
    r.add_argument("--target-flops", type=_parse_fraction, help="keep at most this fraction of the model's FLOPs "
                   "(ranks allocated per layer for the least error)")
    r.add_argument("--target-params", type=_parse_fraction, help="keep at most this fraction of the parameters")
    r.add_argument("--target-latency", type=_parse_fraction, help="keep at most this fraction of the measured "
                   "time (layers timed on --device; slower separable forms left alone)")
    r.add_argument("--energy", type=_parse_fraction, help="per layer, keep this fraction of the spectral energy")
    r.add_argument("--kinds", type=_parse_kinds, help="layer kinds to rewrite, comma-separated: kxk (KxK convs, "
                   "separable pairs), pointwise (1x1 convs), linear (both as low-rank pairs), or all (default: all "
                   "under a --target-*/--energy budget, kxk with --rank)")
    r.add_argument("--strict", action="store_true", help="refuse a budget that is not met (default, best effort: a "
                   "missed --target-latency keeps the fastest plan measured faster than the original, a --target-flops "
                   "/ --target-params below the smallest reachable gets the cheapest plan, each with a note)")
    r.add_argument("--ragged", action="store_true", help="per-channel ranks from each channel's spectrum: same "
                   "cost as the uniform rank, lower error (the depthwise conv gathers its inputs)")
    r.add_argument("--int8-friendly", action="store_true", help="balance each pair's depthwise filters and "
                   "pointwise columns to equal ranges, so it loses less to int8 quantization (the float model is "
                   "unchanged in value)")


def _calibration_flags(r: argparse.ArgumentParser) -> None:
    """Calibration data and its preprocessing (both routes; ``--calib-layout``, ``--sequential``: ONNX)."""
    r.add_argument("--calibration", help="a folder of images, or a .pt tensor file (ONNX: .npy/.npz/.pt): "
                   "data-aware initialisation (and data-aware allocation under a budget)")
    r.add_argument("--calib-size", type=_parse_size, help="calibration images: resize to HxW (default: the "
                   "model's input size)")
    r.add_argument("--calib-mean", type=_parse_floats, help="calibration images: per-channel mean subtracted "
                   "after scaling to [0, 1], e.g. 0.485,0.456,0.406")
    r.add_argument("--calib-std", type=_parse_floats, help="calibration images: per-channel std divided by "
                   "after the mean, e.g. 0.229,0.224,0.225")
    r.add_argument("--calib-layout", choices=("nchw", "nhwc"), default="nchw",
                   help="calibration images: the input's layout (ONNX models; default nchw)")
    r.add_argument("--calib-bgr", action="store_true", help="calibration images: BGR channel order (OpenCV-"
                   "trained models)")
    r.add_argument("--calib-max-images", type=int, default=64, help="calibration images: use at most this "
                   "many (default 64)")
    r.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX calibration: refit in execution order on the rewritten graph (default: when it "
                        "fits in time) or, with --no-sequential, on the original model's activations")


def _timing_flags(r: argparse.ArgumentParser) -> None:
    """Where models are timed: the runtime, the device, onnxruntime's session options."""
    r.add_argument("--runtime", choices=("eager", "inductor", "onnxruntime"),
                   help="what the model is timed in, for --target-latency and the report: PyTorch eager, "
                        "torch.compile (Inductor) or onnxruntime (default: onnxruntime for an .onnx model or "
                        "output, eager otherwise)")
    r.add_argument("--device", help="device to time layers on for --target-latency (default: cpu)")
    r.add_argument("--latency-cache", help="JSON file caching layer timings across runs")
    r.add_argument("--overwrite", action="store_true", help="allow writing over the source file (ONNX)")
    r.add_argument("--ort-threads", type=int, help="onnxruntime runtime: intra-op threads of the sessions models "
                   "and layers are timed in (default: onnxruntime's)")
    r.add_argument("--ort-optimization", choices=("disable", "basic", "extended", "all"),
                   help="onnxruntime runtime: graph optimisation level for timing (default: all)")
    r.add_argument("--ort-provider", help="onnxruntime runtime: execution provider for timing "
                   "(default: CPUExecutionProvider)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dsrewrite",
        description="Rewrite standard convolutions into low-rank depthwise-separable pairs and report the savings.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    # --debug is also accepted after the command; SUPPRESS keeps a command's default from overriding the top level's
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")

    r = sub.add_parser("rewrite", parents=[debug], help="rewrite a model", description=(
        "Rewrite the standard convolutions of a model. SRC is torchvision:NAME, package.module:factory "
        "or a .onnx file. Without --weights the model has random weights (weights=None)."))
    for add in (_model_flags, _budget_flags, _calibration_flags, _timing_flags):
        add(r)
    r.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (third-party warnings "
                   "and logs silenced too)")
    r.set_defaults(func=_cmd_rewrite)

    s = sub.add_parser("report", parents=[debug], help="print a saved report", description="Print a saved JSON report.")
    s.add_argument("path", help="report JSON written by `dsrewrite rewrite --report`")
    s.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    s.set_defaults(func=_cmd_report)

    d = sub.add_parser("demo", parents=[debug], help="run the built-in end-to-end demo", description=(
        "Train a small CNN on scikit-learn's bundled digits, rewrite it to about half its FLOPs, "
        "fine-tune it back by distillation and print the report."))
    d.add_argument("--quick", action="store_true", help="a short run (used by tests)")
    d.set_defaults(func=_cmd_demo)
    p.commands = dict(sub.choices)
    return p


@contextlib.contextmanager
def quiet_third_party(onnx: bool = False) -> Iterator[None]:
    """Silence what other libraries print while the block runs; restored afterwards.

    Python ``warnings`` and every ``logging`` record below ERROR (onnxscript, onnx_ir, torch.onnx, ...);
    with ``onnx=True`` also onnx-graphsurgeon's own logger (it prints to stdout, whole weight tensors in some
    warnings) and onnxruntime's default logger (severity 3: errors only). Errors still reach the caller as
    exceptions.
    """
    gs_logger = ort = None
    if onnx:
        try:
            from onnx_graphsurgeon.logger import G_LOGGER as gs_logger  # optional dependency: may be absent
        except ImportError:
            pass
        try:
            import onnxruntime as ort  # optional dependency (the onnx extra): may be absent
        except ImportError:
            pass
    old_disable = logging.root.manager.disable
    old_gs = gs_logger.severity if gs_logger is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        if gs_logger is not None:
            gs_logger.severity = gs_logger.CRITICAL + 1  # its critical() raises: the message reaches us anyway
        if ort is not None:
            ort.set_default_logger_severity(3)
        try:
            yield
        finally:
            logging.disable(old_disable)
            if gs_logger is not None:
                gs_logger.severity = old_gs
            if ort is not None:
                ort.set_default_logger_severity(2)  # onnxruntime's default (no getter to read it back)


def _uses_onnx(a: argparse.Namespace) -> bool:
    return getattr(a, "runtime", None) == "onnxruntime" or any(
        str(p or "").lower().endswith(".onnx") for p in (getattr(a, "src", None), getattr(a, "out", None)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [w for w in argv if w != "--debug"]
    if len(words) == 1 and words[0] in ("rewrite", "report"):  # a command without its arguments: its usage
        parser.commands[words[0]].print_help()
        return 2
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    quiet = quiet_third_party(onnx=_uses_onnx(a)) if getattr(a, "quiet", False) else contextlib.nullcontext()
    try:
        with quiet:
            return int(a.func(a) or 0)
    except DsrewriteError as e:
        if a.debug:
            raise
        print(f"dsrewrite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsrewrite: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI never shows a traceback unless --debug
        if a.debug:
            raise
        print(f"dsrewrite: error: {first_line(e, 300, typed=True)} (run with --debug for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
