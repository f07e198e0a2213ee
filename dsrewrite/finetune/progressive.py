"""Progressive rewriting: rewrite a few layers, fine-tune, rewrite the next few (deepest first by default).

One-shot low-rank replacement of every layer compounds the error layer after layer; rewriting in stages
lets fine-tuning absorb each stage's error before the next. Each stage is one ``dsrewrite.rewrite(...,
include=...)`` call on the previous stage's model: pairs rewritten earlier (separable or low-rank) are skipped
there, their halves reported as parts of a pair, so only the stage's layers change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

from torch import nn

from ..api import rewrite
from ..errors import DsrewriteError
from ..plan.planner import Selector, selected
from ..plan.policy import RankArg
from ..report import Report
from .loop import History, fit

__all__ = ["progressive", "ProgressiveResult", "plan_stages"]

StagesArg = Union[int, Sequence[Selector]]


@dataclass
class ProgressiveResult:
    """``model``: the final student; ``report``: whole-run report (original -> final); per-stage reports
    and fine-tuning histories in ``stage_reports`` / ``histories``. Unpacks as ``model, report``."""

    model: nn.Module
    report: Report
    stage_reports: List[Report] = field(default_factory=list)
    histories: List[History] = field(default_factory=list)
    stages: List[List[str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        """``model, report = progressive(...)``."""
        return iter((self.model, self.report))


def plan_stages(names: Sequence[str], stages: StagesArg) -> List[List[str]]:
    """Split rewritable layer ``names`` (in forward order) into stages.

    ``stages`` as an int ``n``: ``n`` contiguous groups, the deepest group first. As a list of selectors
    (globs, lists of globs or callables): stage ``i`` takes the not-yet-taken names its selector matches.
    """
    names = list(names)
    if isinstance(stages, bool) or (isinstance(stages, int) and stages < 1):
        raise DsrewriteError(f"stages must be a positive int or a list of include patterns, got {stages!r}")
    if isinstance(stages, int):
        n = min(stages, len(names)) or 1
        size, extra = divmod(len(names), n)
        groups, start = [], 0
        for i in range(n):
            end = start + size + (1 if i < extra else 0)
            groups.append(names[start:end])
            start = end
        return [g for g in reversed(groups) if g]
    if isinstance(stages, str) or callable(stages):
        stages = [stages]
    out, taken = [], set()
    for sel in stages:
        group = [n for n in names if n not in taken and selected(n, include=sel) is None]
        taken.update(group)
        if group:
            out.append(group)
    return out


def progressive(model: nn.Module, example_inputs: Any, loader: Any, *, stages: StagesArg = 2,
                rank: RankArg = "auto", include: Selector = None, exclude: Selector = None,
                epochs_per_stage: Optional[int] = None, steps_per_stage: Optional[int] = None,
                backend: str = "auto", on_stage: Optional[Callable[[int, nn.Module, Report], None]] = None,
                progress: bool = True, ragged: bool = False, kinds: Any = None,
                **fit_kwargs: Any) -> ProgressiveResult:
    """Rewrite and fine-tune ``model`` in stages; the original ``model`` is the teacher and stays unchanged.

    Args:
        model, example_inputs, rank, include, exclude, backend, ragged, kinds: as for :func:`dsrewrite.rewrite`
            (``include``/``exclude``/``kinds`` pick the layers; ``stages`` orders them; ``kinds="all"`` takes
            1x1 convs and linear layers too, as low-rank pairs).
        loader: batches for :func:`fit`.
        stages: an int (that many groups of layers, deepest first) or a list of include selectors.
        epochs_per_stage / steps_per_stage: fine-tuning length after each stage (default one epoch).
        on_stage: called as ``on_stage(i, student, stage_report)`` after stage ``i`` is fine-tuned.
        **fit_kwargs: passed to :func:`fit` (lr, train, validate, device, ..., or ``config=`` a
            :class:`FitConfig`); ``progress`` and the bar's ``desc`` are this function's own.
    """
    plan = rewrite(model, example_inputs, rank=rank, include=include, exclude=exclude, backend=backend,
                   measure_time=False, name=fit_kwargs.pop("name", None), ragged=ragged, kinds=kinds)
    groups = plan_stages([L.name for L in plan.report.rewritten], stages)
    if not groups:
        raise DsrewriteError("no layer to rewrite: " + "; ".join(plan.report.notes or ["nothing selected"]))
    student: nn.Module = model
    result = ProgressiveResult(model=model, report=plan.report, stages=groups)
    by_name = {}
    # the stage length where given (otherwise a config's, or one epoch)
    length = {k: v for k, v in (("epochs", epochs_per_stage), ("steps", steps_per_stage)) if v is not None}
    for i, group in enumerate(groups):
        members = set(group)
        if progress:
            print(f"stage {i + 1}/{len(groups)}: rewriting {len(group)} layer(s): {', '.join(group)}", flush=True)
        step = rewrite(student, example_inputs, rank=rank, include=lambda n, s=members: n in s, backend=backend,
                       measure_time=False, name=plan.report.model, ragged=ragged, kinds=kinds)
        done = {L.name for L in step.report.rewritten}
        if done != members:
            raise DsrewriteError(f"stage {i + 1} rewrote {sorted(done)} instead of {sorted(members)}")
        by_name.update({L.name: L for L in step.report.rewritten})
        student = step.model
        result.stage_reports.append(step.report)
        history = fit(student, model, loader, **length, progress=progress, desc=f"stage {i + 1}", **fit_kwargs)
        result.histories.append(history)
        if on_stage is not None:
            on_stage(i, student, step.report)
    last = result.stage_reports[-1]
    report = Report(
        layers=[by_name.get(L.name, L) for L in plan.report.layers], model=plan.report.model,
        route=last.route, input_shapes=plan.report.input_shapes, params_before=plan.report.params_before,
        params_after=last.params_after, flops_before=plan.report.flops_before, flops_after=last.flops_after,
        notes=[f"progressive: {len(groups)} stages, fine-tuned after each"] + list(plan.report.notes),
    )
    result.model, result.report = student, report
    return result
