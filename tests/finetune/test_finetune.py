"""Fine-tuning: distillation hooks, parameter selection, fit and its config, progressive rewriting."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
from dsrewrite.errors import DsrewriteError
from dsrewrite.finetune import (Distiller, FitConfig, fit, kd_loss, param_groups, plan_stages, progressive,
                                select_parameters, separable_layers)


class Net(nn.Module):
    """Small CNN; ``out`` picks the output kind: a tensor, a tuple or a dict."""

    def __init__(self, out: str = "tensor") -> None:
        super().__init__()
        self.out = out
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        f = F.relu(self.conv3(x)).mean((2, 3))
        logits = self.fc(f)
        if self.out == "tuple":
            return logits, f
        if self.out == "dict":
            return {"features": f, "logits": logits}
        return logits


def make(gen, out="tensor", rank=2):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    teacher = Net(out).eval()
    x = torch.randn(6, 3, 8, 8, generator=gen)
    result = dsrewrite.rewrite(teacher, x, rank=rank, measure_time=False)
    return teacher, result, x


def n_hooks(*models):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_hooks_attach_and_detach_without_leaks(gen):
    teacher, result, x = make(gen)
    student = result.model
    base = n_hooks(student, teacher)
    d = Distiller(student, teacher, result)
    with d:
        assert d.num_handles > 0 and n_hooks(student, teacher) == base + d.num_handles
        out = d(x, torch.randint(0, 5, (6,), generator=gen))
        assert set(out.parts) == {"feature", "logit", "task"}
    assert d.num_handles == 0 and n_hooks(student, teacher) == base
    with pytest.raises(RuntimeError, match="boom"):  # an exception inside the block still removes them
        with Distiller(student, teacher, result):
            raise RuntimeError("boom")
    assert n_hooks(student, teacher) == base


def test_teacher_frozen_and_unchanged_bit_for_bit(gen):
    teacher, result, x = make(gen)
    teacher.train()  # the user's flags come back afterwards
    before = snapshot(teacher)
    data = [(torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)) for _ in range(3)]
    seen = {}

    def check(student):
        seen["frozen"] = all(not p.requires_grad for p in teacher.parameters())
        seen["eval"] = not any(m.training for m in teacher.modules())

    fit(result.model, teacher, data, epochs=2, train="all", lr=1e-2, validate=check, progress=False)
    with Distiller(result.model, teacher, result) as d:
        teacher.train()  # as a framework calling .train() on a parent module would
        d(*data[0])
    after = teacher.state_dict()
    assert seen == {"frozen": True, "eval": True}
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
def test_loss_decreases_on_a_fixed_batch(gen, kind):
    # full rank: the student can match the teacher exactly, so distillation from perturbed pairs must get close
    teacher, result, x = make(gen, kind, rank="full")
    student = result.model
    with torch.no_grad():
        for m in separable_layers(student).values():
            for p in m.parameters():
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    select_parameters(student, "separable")
    opt = torch.optim.Adam(param_groups(student, 1e-2))
    losses = []
    with Distiller(student, teacher, result, output=(lambda o: o["logits"]) if kind == "dict" else None) as d:
        for _ in range(40):
            out = d(x)  # feature + logit terms
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.parametrize("train", ["separable", "all"])
def test_gradients_reach_only_selected_parameters(gen, train):
    teacher, result, x = make(gen)
    student = result.model
    trainable = select_parameters(student, train)
    pairs = separable_layers(student)
    assert sorted(pairs) == sorted(L.name for L in result.report.rewritten)
    sep = {id(p) for m in pairs.values() for p in m.parameters()}
    expected = sep if train == "separable" else {id(p) for p in student.parameters()}
    assert {id(p) for p in trainable} == expected
    with Distiller(student, teacher, result) as d:
        d(x, torch.randint(0, 5, (6,), generator=gen)).loss.backward()
    for p in student.parameters():
        if id(p) in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    groups = param_groups(student, 1e-3, depthwise_lr=5e-3, pointwise_lr=2e-3)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["depthwise"] == 5e-3 and lrs["pointwise"] == 2e-3
    assert ("rest" in lrs) == (train == "all")
    assert {id(p) for g in groups for p in g["params"]} == expected


def test_kd_loss_matches_reference(gen):
    s, t = torch.randn(7, 11, generator=gen), torch.randn(7, 11, generator=gen)
    for T in (1.0, 3.5):
        ref = F.kl_div(F.log_softmax(s.double() / T, 1), F.softmax(t.double() / T, 1), reduction="batchmean") * T * T
        assert abs(kd_loss(s, t, T).item() - ref.item()) < 1e-5 * max(1.0, ref.item())


def test_feature_loss_is_per_layer_mse_and_weightable(gen):
    teacher, result, x = make(gen)
    student = result.model
    names = [L.name for L in result.report.rewritten]
    acts = {}
    hs = [m.register_forward_hook(lambda m, a, o, k=k, tag=tag: acts.__setitem__((tag, k), o))
          for tag, model in (("s", student), ("t", teacher)) for k in names for m in [model.get_submodule(k)]]
    weights = {names[0]: 3.0, names[-1]: 1.0}
    with Distiller(student, teacher, weights, logit_weight=0, task_weight=0) as d:
        out = d(x)
    for h in hs:
        h.remove()
    mse = {k: F.mse_loss(acts[("s", k)].double(), acts[("t", k)].double()).item() for k in weights}
    ref = sum(w * mse[k] for k, w in weights.items()) / sum(weights.values())
    assert abs(out.loss.item() - ref) < 1e-5 * ref


def test_bad_pairs_are_rejected(gen):
    teacher, result, x = make(gen)
    with pytest.raises(DsrewriteError, match="same module"):
        Distiller(teacher, teacher)
    with pytest.raises(DsrewriteError, match="no module named"):
        Distiller(result.model, teacher, ["conv9"])
    with pytest.raises(DsrewriteError, match="train must be"):
        fit(result.model, teacher, [(x, None)], train="some")


def test_fit_history_steps_and_validation(gen):
    teacher, result, x = make(gen)
    data = [(torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)) for _ in range(4)]
    h = fit(result.model, teacher, data, epochs=3, steps=10, validate=lambda m: {"acc": 0.5}, progress=False)
    assert h.steps == 10 and len(h.losses) == 10 and len(h.epochs) == 3
    assert [e["steps"] for e in h.epochs] == [4, 8, 10] and h.metric("acc") == [0.5] * 3
    assert all(k in h.epochs[0] for k in ("loss", "feature", "logit", "task"))


def test_fit_with_bf16_autocast_on_cpu(gen):
    teacher, result, x = make(gen)
    h = fit(result.model, teacher, [(x, None)] * 2, epochs=1, amp=True, progress=False)
    assert h.steps == 2 and all(torch.isfinite(torch.tensor(h.losses)))


def _fit_once(seed, config=None, **options):
    """Models, data and fit's randomness all from ``seed``: the student's weights and history after fit."""
    torch.manual_seed(seed)
    teacher = Net().eval()
    x = torch.randn(6, 3, 8, 8)
    student = dsrewrite.rewrite(teacher, x, rank=2, measure_time=False).model
    data = [(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))) for _ in range(3)]
    h = fit(student, teacher, data, config, **options)
    return snapshot(student), h


def test_fit_config_equals_keywords(gen):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    opts = dict(epochs=2, train="all", lr=5e-3, depthwise_lr=1e-2, weight_decay=0.01, temperature=2.0,
                max_grad_norm=1.0, validate=lambda m: {"acc": 0.5}, progress=False)
    p_kw, h_kw = _fit_once(seed, **opts)
    p_cfg, h_cfg = _fit_once(seed, FitConfig(**opts))
    # the same ops in the same order on the CPU: identical in practice; 1e-6 leaves room for nothing else
    assert h_cfg.steps == h_kw.steps == 6 and h_cfg.metric("acc") == [0.5, 0.5]
    torch.testing.assert_close(h_cfg.losses, h_kw.losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p_cfg, p_kw, rtol=1e-6, atol=1e-6)
    # keywords override the config's values (as RewriteConfig.build does); the config itself is unchanged
    cfg = FitConfig(epochs=3, progress=False)
    p_over, h_over = _fit_once(seed, cfg, epochs=2, train="all", lr=5e-3, depthwise_lr=1e-2, weight_decay=0.01,
                               temperature=2.0, max_grad_norm=1.0, validate=lambda m: {"acc": 0.5})
    assert cfg.epochs == 3 and len(h_over.epochs) == 2
    torch.testing.assert_close(p_over, p_kw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config, options, message", [
    (None, {"epoch": 2}, "unknown option 'epoch' for fit"),
    ("epochs=2", {}, "config must be a dsrewrite.finetune.FitConfig, got str"),
    (FitConfig(epochs=2), {"steps": 0}, "steps must be a positive int, got 0"),
    (None, {"train": "some"}, "train must be one of separable, all or None"),
    (None, {"schedule": "linear"}, "schedule must be 'cosine' or None"),
    (None, {"temperature": -1.0}, "temperature must be > 0"),
])
def test_fit_config_errors_are_one_line(gen, config, options, message):
    teacher, result, x = make(gen)
    before = snapshot(result.model)
    with pytest.raises(DsrewriteError, match=message) as e:
        fit(result.model, teacher, [(x, None)], config, **options)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in result.model.state_dict().items())  # nothing trained
    assert all(p.requires_grad for p in result.model.parameters())  # refused before choosing what trains


def test_fit_config_is_frozen_and_checked_when_built():
    with pytest.raises(DsrewriteError, match="epochs must be a positive int, got 0"):
        FitConfig(epochs=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FitConfig().lr = 1.0
    assert FitConfig(device="cpu") == FitConfig(device=torch.device("cpu"))
    assert FitConfig.build(FitConfig(lr=1.0, epochs=2), {"lr": 2.0}) == FitConfig(lr=2.0, epochs=2)


def test_progressive_rewrites_deepest_first_and_rewrites_again(gen):
    teacher, _, x = make(gen)
    before = snapshot(teacher)
    data = [(torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)) for _ in range(2)]
    res = progressive(teacher, x, data, stages=2, rank=2, epochs_per_stage=1, progress=False)
    assert res.stages == [["conv3"], ["conv1", "conv2"]]
    assert sorted(L.name for L in res.report.rewritten) == ["conv1", "conv2", "conv3"]
    # the second stage saw the first stage's pairs and skipped their parts, each with a reason
    skipped = {L.name: L.reason for L in res.stage_reports[1].skipped}
    for half in ("conv3.depthwise", "conv3.pointwise"):
        assert skipped[half].startswith(("already depthwise", "part of a pair")), skipped
    assert sorted(separable_layers(res.model)) == ["conv1", "conv2", "conv3"]
    assert res.report.flops_after == res.stage_reports[1].flops_after < res.report.flops_before
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with torch.no_grad():
        assert res.model(x).shape == teacher(x).shape


def test_plan_stages():
    names = ["a", "b", "c", "d", "e"]
    assert plan_stages(names, 2) == [["d", "e"], ["a", "b", "c"]]
    assert plan_stages(names, 9) == [["e"], ["d"], ["c"], ["b"], ["a"]]
    assert plan_stages(names, ["d*", ["a", "e"], lambda n: True]) == [["d"], ["a", "e"], ["b", "c"]]
