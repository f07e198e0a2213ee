"""Plans you can keep (issue 23 items 1, 2): ``result.plan`` saved and loaded as JSON, replayed by
``dsrewrite.apply_plan`` on a fresh copy of the model in a fresh process, a fine-tuned ``state_dict`` loaded into
the replayed model reproducing the fine-tuned outputs, a plan refused on a model it does not fit, the CLI's
``--save-plan`` / ``--plan``, and ``torch.save`` / ``torch.load`` of a rewritten model in a fresh process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dsrewrite
from dsrewrite.cli import main
from dsrewrite.plan.planfile import PLAN_VERSION, Plan

from tests.conftest import rel_err

TINYNET = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, width=24):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.pw(x))
        return self.head(x.mean((2, 3)))


def make(seed=0, width=24):
    """Input channels of unequal weight, so ragged ranks differ per channel."""
    torch.manual_seed(seed)
    net = Net(width)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
                m.weight.mul_(torch.logspace(-1, 1, m.in_channels)[torch.randperm(m.in_channels)][None, :, None, None])
    return net.eval()
'''


@pytest.fixture
def tiny(tmp_path, gen, monkeypatch):
    """``(tinynet module, seed)``: the model's source in ``tmp_path``, importable here and in a fresh process."""
    (tmp_path / "tinynet.py").write_text(TINYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tinynet", None)
    import tinynet

    yield tinynet, int(torch.randint(0, 2**31, (1,), generator=gen))
    sys.modules.pop("tinynet", None)


def fresh_python(code: str, cwd) -> str:
    """Run ``code`` in a fresh interpreter (``cwd`` importable); its stdout, or the failure with its stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_save_load_round_trip(tiny, tmp_path):
    tinynet, seed = tiny
    model, x = tinynet.make(seed), torch.randn(1, 3, 8, 8)
    res = dsrewrite.rewrite(model, x, rank={"c*": 3, "head": 4}, measure_time=False, name="tiny")
    plan = res.plan
    assert isinstance(plan, dsrewrite.Plan) and plan.route == "fx" and plan.version == PLAN_VERSION
    assert plan.ranks == {"stem": None, "c1": 3, "c2": 3, "pw": None, "head": 4}
    assert {L.name: L.reason for L in plan.layers if not L.rewritten} == {
        "stem": "not matched by any rank pattern", "pw": "not matched by any rank pattern"}
    assert plan.options["rank"] == {"c*": 3, "head": 4} and plan.options["calibration"] is False
    assert plan.versions == {"dsrewrite": dsrewrite.__version__, "torch": torch.__version__}
    assert [list(p) for p in plan.model_layers()] == [[n, list(m.weight.shape)] for n, m in sorted(
        (n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))]
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())  # readable: the fields by name
    assert data["format"] == "dsrewrite.plan" and data["fingerprint"]["hash"] == plan.fingerprint
    assert data["layers"][1] == {"name": "c1", "kind": "kxk", "rank": 3, "channel_ranks": None,
                                 "gather_input": False, "in_channels": 16, "out_channels": 24, "kernel": [3, 3],
                                 "weight_shape": [24, 16, 3, 3], "reason": None}
    assert Plan.load(path) == plan
    # edited or foreign files: one line each
    data["version"] = PLAN_VERSION + 1
    (tmp_path / "newer.json").write_text(json.dumps(data))
    data["version"], data["layers"][1]["weight_shape"] = PLAN_VERSION, [24, 16, 5, 5]
    (tmp_path / "edited.json").write_text(json.dumps(data))
    (tmp_path / "other.json").write_text("{}")
    for name, words in (("newer", "version 2 plan; this dsrewrite reads up to version 1"),
                        ("edited", "does not match its layers"), ("other", "is not a dsrewrite plan"),
                        ("missing", "plan file not found")):
        with pytest.raises(dsrewrite.DsrewriteError, match=words) as e:
            Plan.load(tmp_path / f"{name}.json")
        assert "\n" not in str(e.value)


def test_calibrated_ragged_plan_replays_in_a_fresh_process_and_takes_fine_tuned_weights(tiny, tmp_path):
    """The issue's 'done when': a calibrated, ragged target_flops plan, saved; a fresh process rebuilds it on a
    fresh copy of the model and loads the fine-tuned state_dict: same outputs (rel <= 1e-5)."""
    tinynet, seed = tiny
    model = tinynet.make(seed)
    x = torch.randn(2, 3, 8, 8)
    res = dsrewrite.rewrite(model, x, target_flops=0.5, ragged=True, calibration=torch.randn(8, 3, 8, 8),
                            measure_time=False)
    plan = res.plan
    assert plan.options["calibration"] is True and plan.options["target_flops"] == 0.5 and plan.options["ragged"]
    ragged = [L for L in plan.layers if L.channel_ranks]
    assert ragged and any(len(set(L.channel_ranks)) > 1 for L in ragged)
    for L in ragged:  # the plan's counts are those of the installed pair (after calibration)
        index = res.model.get_submodule(L.name).channel_index
        assert torch.bincount(index, minlength=L.in_channels).tolist() == L.channel_ranks
    # "fine-tune": a few steps on random targets
    tuned = res.model.train()
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(tuned(x), torch.randn(2, 10)).backward()
        opt.step()
    tuned.eval()
    with torch.no_grad():
        want = tuned(x)
        assert rel_err(want, model(x)) > 1e-3  # the fine-tuning changed something
    plan.save(tmp_path / "plan.json")
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    out = fresh_python(f"""
        import json, torch, dsrewrite, tinynet
        plan = dsrewrite.Plan.load("plan.json")
        io = torch.load("io.pt")
        res = dsrewrite.apply_plan(tinynet.make({seed}), plan, io["x"])
        same = [(L.rank, L.channel_ranks, L.gather_input) for L in res.plan.layers] == \\
               [(L.rank, L.channel_ranks, L.gather_input) for L in plan.layers]
        res.model.load_state_dict(torch.load("tuned.pt"))
        with torch.no_grad():
            got = res.model.eval()(io["x"])
        err = float((got.double() - io["want"].double()).norm() / io["want"].double().norm())
        print(json.dumps({{"same": same, "err": err, "route": res.report.route}}))
    """, tmp_path)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["same"] and got["route"] == "fx"
    assert got["err"] <= 1e-5, got
    # with calibration data, the replay refits as rewrite does: same layers, ranks and state_dict shapes
    again = dsrewrite.apply_plan(tinynet.make(seed), plan, x, calibration=torch.randn(8, 3, 8, 8))
    assert again.plan.ranks == plan.ranks
    assert {k: v.shape for k, v in again.model.state_dict().items()} == {k: v.shape for k, v in
                                                                         tuned.state_dict().items()}
    assert any(n.startswith("calibrated ") for n in again.report.notes)


def test_replay_on_the_swap_route_and_in_place(tiny, route):
    tinynet, seed = tiny
    model, x = tinynet.make(seed), torch.randn(1, 3, 8, 8)
    res = dsrewrite.rewrite(model, x, energy=0.7, ragged=True, measure_time=False)
    assert res.plan.route == route
    fresh = tinynet.make(seed)
    rebuilt = dsrewrite.apply_plan(fresh, res.plan, x, inplace=True)
    assert rebuilt.plan.layers == res.plan.layers and rebuilt.report.route == route
    if route != "fx":  # the swap route rewrites the module tree itself
        assert rebuilt.model is fresh
    with torch.no_grad():  # the same factors: SVD at the same ranks and channel counts
        assert rel_err(rebuilt.model(x), res.model(x)) < 1e-6


def test_per_channel_ranks_and_form_are_taken_from_the_plan(tiny, gen):
    """A plan's channel ranks are kept as given (each channel's truncated SVD at its own count: numpy reference)
    and its depthwise form is the one installed."""
    import numpy as np

    tinynet, seed = tiny
    model, x = tinynet.make(seed), torch.randn(1, 3, 8, 8)
    plan = dsrewrite.rewrite(model, x, rank=2, measure_time=False).plan
    c1, c2 = plan.by_name()["c1"], plan.by_name()["c2"]
    counts = torch.randint(0, 5, (16,), generator=gen)
    while int(counts.sum()) != 32:  # 16 channels x rank 2 terms, spread at random
        i = int(torch.randint(0, 16, (1,), generator=gen))
        counts[i] = min(9, max(0, int(counts[i]) + (1 if int(counts.sum()) < 32 else -1)))
    c1.channel_ranks, c2.gather_input = counts.tolist(), True
    res = dsrewrite.apply_plan(tinynet.make(seed), plan, x)
    pair = res.model.get_submodule("c1")
    assert torch.bincount(pair.channel_index, minlength=16).tolist() == counts.tolist()
    assert res.model.get_submodule("c2").gather_input and res.plan.by_name()["c2"].gather_input
    w = model.c1.weight.detach().double().numpy()
    ref = np.zeros_like(w)
    for c, k in enumerate(counts.tolist()):
        u, s, vh = np.linalg.svd(w[:, c].reshape(w.shape[0], -1), full_matrices=False)
        ref[:, c] = ((u[:, :k] * s[:k]) @ vh[:k]).reshape(w.shape[0], 3, 3)
    # the pair's dense weight, by hand: filter j reads input channel channel_index[j]
    dw = pair.depthwise.weight.detach().double().reshape(32, 9)
    pw = pair.pointwise.weight.detach().double().reshape(24, 32)
    got = torch.zeros(24, 16, 9, dtype=torch.float64).index_add(1, pair.channel_index, pw[:, :, None] * dw[None])
    np.testing.assert_allclose(got.reshape(w.shape).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_a_plan_that_does_not_fit_is_refused(tiny):
    tinynet, seed = tiny
    x = torch.randn(1, 3, 8, 8)
    plan = dsrewrite.rewrite(tinynet.make(seed), x, rank=2, measure_time=False).plan
    other = tinynet.make(seed, width=20)  # c1's and c2's weights change shape
    with pytest.raises(dsrewrite.DsrewriteError, match=r"the plan does not fit this model \(made for [0-9a-f]{16}\): "
                       r"layer 'c1' has weight shape \[20, 16, 3, 3\] in the model, \[24, 16, 3, 3\] in the plan"):
        dsrewrite.apply_plan(other, plan, x)
    fewer = tinynet.make(seed)
    fewer.pw = torch.nn.Identity()
    with pytest.raises(dsrewrite.DsrewriteError, match="layer 'pw' of the plan is not in the model"):
        dsrewrite.apply_plan(fewer, plan, x, inplace=True)
    assert isinstance(fewer.c1, torch.nn.Conv2d)  # a refused in-place replay leaves the model as it was
    with pytest.raises(dsrewrite.DsrewriteError, match="apply_plan does not take 'target_flops': the plan decides"):
        dsrewrite.apply_plan(tinynet.make(seed), plan, x, target_flops=0.5)


def test_cli_save_plan_then_plan(tiny, tmp_path, monkeypatch, capsys):
    tinynet, seed = tiny
    monkeypatch.chdir(tmp_path)
    common = ["rewrite", "tinynet:make", "--input-shape", "1,3,8,8", "-q"]
    assert main([*common, "--target-flops", "0.5", "--ragged", "--no-time", "--save-plan", "p.json",
                 "--report", "a.json"]) == 0
    assert main([*common, "--plan", "p.json", "--report", "b.json", "-o", "m.pt"]) == 0
    a, b = (json.loads((tmp_path / f).read_text())["layers"] for f in ("a.json", "b.json"))
    def ranks(layers):
        return [(L["name"], L["rank"] if L["rewritten"] else None, L["channel_ranks"]) for L in layers]

    assert ranks(a) == ranks(b) and any(L["channel_ranks"] for L in a)
    assert Plan.load("p.json").ranks == {L["name"]: L["rank"] if L["rewritten"] else None for L in a}
    capsys.readouterr()
    assert main([*common, "--plan", "p.json", "--rank", "2"]) == 2
    assert capsys.readouterr().err == ("dsrewrite: error: --rank cannot be combined with --plan: the plan decides "
                                       "the layers and ranks (and nothing is timed)\n")
    assert main([*common, "--plan", "nowhere.json"]) == 2
    assert "plan file not found: nowhere.json" in capsys.readouterr().err


def test_torch_save_and_load_in_a_fresh_process(tiny, tmp_path, monkeypatch):
    """``torch.save(result.model)`` of the fx route (a GraphModule) and of the module-swap route, and the
    ``.pt2`` export, each loaded in a fresh process: they run and give the same outputs."""
    from dsrewrite import api

    tinynet, seed = tiny
    model, x = tinynet.make(seed), torch.randn(2, 3, 8, 8)
    fx = dsrewrite.rewrite(model, x, target_flops=0.5, ragged=True, measure_time=False)
    torch.export.save(torch.export.export(fx.model, (x,)), tmp_path / "fx.pt2")
    with monkeypatch.context() as m:
        m.setattr(api, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("tracing disabled by the test")))
        swap = dsrewrite.rewrite(model, x, target_flops=0.5, ragged=True, measure_time=False)
    assert (fx.report.route, swap.report.route) == ("fx", "fx-submodules+module-swap")
    torch.save(fx.model, tmp_path / "fx.pt")
    torch.save(swap.model, tmp_path / "swap.pt")
    with torch.no_grad():
        torch.save({"x": x, "fx": fx.model(x), "swap": swap.model(x)}, tmp_path / "io.pt")
    out = fresh_python("""
        import json, torch
        io = torch.load("io.pt")
        errs = {}
        with torch.no_grad():
            for name in ("fx", "swap"):
                m = torch.load(name + ".pt", weights_only=False)
                errs[name] = float((m(io["x"]) - io[name]).abs().max() / io[name].abs().max())
            errs["pt2"] = float((torch.export.load("fx.pt2").module()(io["x"]) - io["fx"]).abs().max()
                                / io["fx"].abs().max())
        print(json.dumps(errs))
    """, tmp_path)
    errs = json.loads(out.strip().splitlines()[-1])
    assert all(e <= 1e-5 for e in errs.values()), errs
