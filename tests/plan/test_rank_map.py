"""Ranks by layer (issue 23 item 3): ``rank={glob: rank}``, first match wins, layers matched by none left alone,
every layer kind considered; on the torch routes (fx, module swap), the ONNX route and the torch.compile backend;
bad mappings refused in one line; the CLI's ``--rank GLOB=RANK,...``."""
import fnmatch
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
from dsrewrite.cli import _parse_rank, main
from dsrewrite.plan.policy import UNMATCHED, RankMap

from tests.conftest import rel_err


class Net(nn.Module):
    """Every kind: KxK convs in two blocks, a 1x1 conv, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1))
        self.block2 = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 1))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.block1(x))
        x = F.relu(self.block2(x))
        return self.head(x.mean((2, 3)))


MAPPING = {"block1.0": 2, "block1.*": 5, "block2.*": "full", "head": 3}  # stem matched by none


def expected_ranks(model, mapping):
    """Independent reading of the semantics: the first glob in order wins; 'full' is min(Cout, K) per channel
    (KxK) or min(Cin, Cout) (low rank); no match: left alone."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        value = next((v for g, v in mapping.items() if fnmatch.fnmatchcase(name, g)), None)
        w = m.weight
        taps = math.prod(w.shape[2:]) if w.dim() > 2 and math.prod(w.shape[2:]) > 1 else None
        full = min(w.shape[0], taps) if taps else min(w.shape[0], w.shape[1])
        out[name] = None if value is None else (full if value == "full" else min(int(value), full))
    return out


@pytest.fixture
def net(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return Net().eval(), torch.randn(2, 3, 8, 8, generator=gen)


def test_first_match_wins_and_unmatched_left_alone(net, route):
    model, x = net
    res = dsrewrite.rewrite(model, x, rank=MAPPING, measure_time=False)
    assert res.report.route == route
    got = {L.name: L.rank if L.rewritten else None for L in res.report.layers}
    assert got == expected_ranks(model, MAPPING)
    assert got["block1.0"] == 2  # "block1.0" comes before "block1.*"
    stem = next(L for L in res.report.layers if L.name == "stem")
    assert not stem.rewritten and stem.reason == UNMATCHED
    # the kinds a mapping names: the 1x1 conv and the linear head are rewritten too (default kinds: all)
    kinds = {L.name: L.kind for L in res.report.rewritten}
    assert kinds["block2.2"] == "pointwise" and kinds["head"] == "linear"
    # every layer mapped to "full": the whole model is exact
    exact = dsrewrite.rewrite(model, x, rank={"*": "full"}, measure_time=False)
    with torch.no_grad():
        assert rel_err(exact.model(x), model(x)) < 1e-5
    assert all(L.rewritten for L in exact.report.layers)


def test_mapped_rank_factors_are_the_truncated_svd(net):
    """A mapped layer's pair is the per-channel truncated SVD at that rank (numpy reference)."""
    model, x = net
    res = dsrewrite.rewrite(model, x, rank={"block1.2": 2}, measure_time=False)
    pair = res.model.get_submodule("block1.2")
    w = model.block1[2].weight.detach().double().numpy()  # [Cout, Cin, 3, 3]
    ref = np.zeros_like(w)
    for c in range(w.shape[1]):
        u, s, vh = np.linalg.svd(w[:, c].reshape(w.shape[0], -1), full_matrices=False)
        ref[:, c] = ((u[:, :2] * s[:2]) @ vh[:2]).reshape(w.shape[0], *w.shape[2:])
    dw = pair.depthwise.weight.detach().double().numpy().reshape(w.shape[1], 2, -1)  # [Cin, r, K]
    pw = pair.pointwise.weight.detach().double().numpy().reshape(w.shape[0], w.shape[1], 2)  # [Cout, Cin, r]
    got = np.einsum("ocr,crk->ock", pw, dw).reshape(w.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert [L.name for L in res.report.rewritten] == ["block1.2"]


def test_kinds_with_a_mapping(net):
    model, x = net
    res = dsrewrite.rewrite(model, x, rank={"*": 2}, kinds="kxk", measure_time=False)
    assert {L.kind for L in res.report.rewritten} == {"kxk"}
    assert dsrewrite.RewriteConfig(rank={"*": 2}).layer_kinds() == ("kxk", "pointwise", "linear")
    assert dsrewrite.RewriteConfig(rank=2).layer_kinds() == ("kxk",)  # one rank for all: KxK, as before
    plain = dsrewrite.rewrite(model, x, rank=2, measure_time=False)
    assert {L.kind for L in plain.report.rewritten} == {"kxk"}


@pytest.mark.parametrize("bad, words", [
    ({}, "at least one"),
    ({1: 2}, "keys must be glob patterns"),
    ({"a": 0}, "rank mapping 'a': rank must be >= 1"),
    ({"a": "half"}, "rank mapping 'a': rank must be a positive int, 'auto' or 'full', got 'half'"),
    ({"a": True}, "rank mapping 'a': rank must be a positive int"),
    ({"a": 2.5}, "rank mapping 'a'"),
])
def test_bad_mappings_are_one_line(bad, words):
    with pytest.raises(dsrewrite.DsrewriteError, match=words) as e:
        dsrewrite.RewriteConfig(rank=bad)
    assert "\n" not in str(e.value)


def test_mapping_with_a_budget_is_refused(net):
    model, x = net
    with pytest.raises(dsrewrite.DsrewriteError, match="give either rank or target_flops, not both"):
        dsrewrite.rewrite(model, x, rank={"*": 2}, target_flops=0.5)


def test_config_key_is_hashable_and_ordered():
    a = dsrewrite.RewriteConfig(rank={"x*": 2, "*": "auto"})
    b = dsrewrite.RewriteConfig(rank={"x*": 2, "*": "auto"})
    c = dsrewrite.RewriteConfig(rank={"*": "auto", "x*": 2})  # another order: another plan
    assert hash(a.plan_key()[0]) == hash(b.plan_key()[0]) and a.plan_key()[0] == b.plan_key()[0]
    assert a.plan_key()[0] != c.plan_key()[0]
    assert isinstance(a.rank, RankMap) and a.rank == {"x*": 2, "*": "auto"} and list(a.rank) == ["x*", "*"]
    assert a.rank.lookup("x1") == 2 and a.rank.lookup("y") == "auto"


def test_onnx_route_and_compile_backend_take_a_mapping(net, tmp_path):
    pytest.importorskip("onnx")
    from dsrewrite.dynamo.backend import last_report
    from dsrewrite.onnx import rewrite as onnx_rewrite

    model, x = net
    path = str(tmp_path / "net.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    res = onnx_rewrite(path, rank={"/block1/*": 2, "*Gemm*": 3})  # ONNX node names
    got = {L.name: L.rank if L.rewritten else None for L in res.report.layers}
    assert got == {"/stem/Conv": None, "/block1/block1.0/Conv": 2, "/block1/block1.2/Conv": 2,
                   "/block2/block2.0/Conv": None, "/block2/block2.2/Conv": None, "/head/Gemm": 3}, got
    with torch.no_grad():
        torch.compile(model, backend="dsrewrite", options=dict(rank=MAPPING, compiler="eager"))(x)
    got = {L.name: L.rank if L.rewritten else None for L in last_report().layers}
    assert got == expected_ranks(model, MAPPING)


def test_cli_rank_parsing(capsys):
    r = _parse_rank("block1.*=2,*=auto")
    assert isinstance(r, RankMap) and list(r.items()) == [("block1.*", 2), ("*", "auto")]
    assert _parse_rank("4") == 4 and _parse_rank("full") == "full"
    assert _parse_rank("a=full") == {"a": "full"}
    for bad, words in (("block1.*=x", "rank mapping 'block1.*'"), ("=2", "GLOB=RANK items"),
                       ("layer4.*", "GLOB=RANK items like")):
        with pytest.raises(SystemExit) as e:  # argparse's error: exit status 2, one line
            main(["rewrite", "torchvision:resnet18", "--rank", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
