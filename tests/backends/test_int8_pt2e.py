"""Rewritten PyTorch models through PT2E int8 quantization with the X86 Inductor quantizer (issue 25): every pair's
convs and linear layers are quantized, and the int8 model runs close to the float rewritten model."""
import builtins
import warnings

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite.errors import DsrewriteError
from dsrewrite.backends.int8 import pt2e_api, quantize_pt2e
from tests.conftest import rel_err

INT8_TOL = 0.1  # int8 output against the float model's (relative Frobenius; measured about 0.01-0.04)

try:
    pt2e_api()
    HAVE_PT2E = True
except DsrewriteError:
    HAVE_PT2E = False
needs_pt2e = pytest.mark.skipif(not HAVE_PT2E, reason="PT2E quantization needs torchao (pip install torchao)")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def quantized_weights(gm) -> int:
    """How many weights the converted graph dequantizes per channel (its int8 conv / linear weights)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "dequantize_per_channel" in str(n.target))


@needs_pt2e
@pytest.mark.parametrize("ragged", [False, True])
def test_every_pair_is_quantized_and_runs(ragged, gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    x = torch.randn(2, 3, 16, 16, generator=gen)
    calib = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(4)]
    r = dsrewrite.rewrite(Net().eval(), x, rank={"c1": 2, "c2": 3, "c3": 8, "fc": 6}, kinds="all", ragged=ragged,
                          measure_time=False, int8_friendly=True)
    assert len(r.report.rewritten) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_pt2e(r.model, x, calibration=calib)
    assert quantized_weights(q) == 8  # both halves of all four pairs
    fresh = torch.randn(3, 3, 16, 16, generator=gen)
    with torch.no_grad():
        assert rel_err(q(fresh), r.model(fresh)) <= INT8_TOL


@needs_pt2e
def test_a_rewritten_timm_model_quantizes_and_runs(gen):
    timm = pytest.importorskip("timm")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = timm.create_model("test_resnet", pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32, generator=gen)
    r = dsrewrite.rewrite(model, x, rank=2, measure_time=False)
    pairs = len(r.report.rewritten)
    assert pairs >= 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_pt2e(r.model, x)
    assert quantized_weights(q) >= 2 * pairs
    with torch.no_grad():
        assert rel_err(q(x), r.model(x)) <= INT8_TOL


def test_without_pt2e_one_line_says_what_to_install(monkeypatch):
    real = builtins.__import__

    def no_pt2e(name, *a, **k):
        if name.startswith(("torchao", "torch.ao.quantization")):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pt2e)
    with pytest.raises(DsrewriteError, match="PT2E quantization is in neither torchao nor torch .*pip install torchao") as e:
        quantize_pt2e(Net().eval(), torch.randn(1, 3, 8, 8))
    assert "\n" not in str(e.value)
