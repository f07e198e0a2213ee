"""Acceptance on torchvision architectures (weights=None): exact at full rank, every eligible conv
rewritten, report totals equal FlopCounterMode and parameter counts of both models."""
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dsrewrite
from dsrewrite import SeparableConv2d
from tests.conftest import rel_err

MODELS = {
    "resnet18": (1, 3, 64, 64),
    "vgg11": (1, 3, 32, 32),
    "mobilenet_v2": (1, 3, 64, 64),
    "efficientnet_b0": (1, 3, 64, 64),
    "googlenet": (1, 3, 64, 64),
    "densenet121": (1, 3, 64, 64),
    "regnet_y_400mf": (1, 3, 64, 64),
}


def _flops(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(x)
    return c.get_total_flops()


def _eligible(model):
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size[0] * m.kernel_size[1] > 1}


@pytest.mark.parametrize("name", list(MODELS))
def test_full_rank_exact_and_totals(name, gen):
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    torch.manual_seed(gen.initial_seed() % 2**31)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(*MODELS[name], generator=gen)
    res = dsrewrite.rewrite(model, x, rank="full", measure_time=False)
    rep = res.report
    assert rep.route == "fx"
    rewritten = {L.name for L in rep.rewritten}
    assert rewritten == _eligible(model)
    for n in rewritten:
        assert isinstance(res.model.get_submodule(n), SeparableConv2d)
        assert rep.layer(n).error < 1e-5
    with torch.no_grad():
        assert rel_err(res.model(x), model(x)) < 1e-4
    assert rep.flops_before == _flops(model, x)
    assert rep.flops_after == _flops(res.model, x)
    assert rep.params_before == sum(p.numel() for p in model.parameters())
    assert rep.params_after == sum(p.numel() for p in res.model.parameters())


def test_error_never_grows_with_rank(gen):
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32, generator=gen)
    errors = [{L.name: L.error for L in dsrewrite.rewrite(model, x, rank=r, measure_time=False).report.rewritten}
              for r in (1, 2, 4, 9, 49)]
    for lower, higher in zip(errors, errors[1:]):
        assert all(higher[n] <= lower[n] + 1e-9 for n in lower)
    assert all(e < 1e-5 for e in errors[-1].values())


def test_ssd_fallback_exact_at_full_rank(gen):
    """ssd300_vgg16 does not symbolic_trace: its conv modules are swapped in place, every user module keeps its class."""
    torch.manual_seed(gen.initial_seed() % 2**31)
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None).eval()
    imgs = [torch.rand(3, 300, 300, generator=gen)]
    res = dsrewrite.rewrite(model, (imgs,), rank="full", measure_time=False)
    rep = res.report
    assert rep.route == "fx-submodules+module-swap"
    assert any("symbolic_trace failed" in n for n in rep.notes)
    assert type(res.model.backbone) is type(model.backbone)  # noqa: E721 - no user module changes class
    assert not any(isinstance(m, torch.fx.GraphModule) for m in res.model.modules())
    assert isinstance(res.model.head.classification_head.module_list[0], SeparableConv2d)
    assert {L.name for L in rep.rewritten} == _eligible(model)
    assert rep.flops_before == _flops(model, imgs)
    assert rep.flops_after == _flops(res.model, imgs)
    assert rep.params_after == sum(p.numel() for p in res.model.parameters())

    def head_out(m):
        out = {}
        h = m.head.register_forward_hook(lambda mod, a, o: out.update(o))
        with torch.no_grad():
            m(imgs)
        h.remove()
        return out

    ref, got = head_out(model), head_out(res.model)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-4, k
    assert isinstance(model.head.classification_head.module_list[0], nn.Conv2d)  # original untouched
