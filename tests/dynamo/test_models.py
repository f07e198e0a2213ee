"""torch.compile(model, backend="dsrewrite") on other libraries' models (issue 21, item 3), and a backend that never
fails the user's compile for a reason of its own.

Each model is small, with random weights (its library's init, norm layers' affine parameters randomised so no
branch is silenced), compiled at rank="full" and compared with the uncompiled original on the example input and
on a second, fresh random input. Tolerance: TOL = 1e-4 relative L2 error in float32 (measured: at most about 4e-6;
the full-rank factors of a float64 SVD stored in float32). Which convs must be rewritten is found independently
of dsrewrite: every conv module with groups=1 and more than one tap that the forward calls (forward hooks).

Speed: Dynamo's own tracing of these models takes a few seconds on a 2-core CPU; the rewritten graphs run with
``compiler="eager"`` (Inductor's cold compile of a UNet is about a minute on that CPU), except the Whisper
encoder and the fallback test, which go through Inductor, with scalar C++ kernels as in dynamo/test_backend.py.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
import dsrewrite.dynamo.backend as dynamo_backend
import dsrewrite.dynamo.inputs as dynamo_inputs
from dsrewrite.dynamo.backend import last_report
from tests.conftest import rel_err

TOL = 1e-4
NOT_REWRITTEN = "compiled without rewriting"  # the backend's fallback warning


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest: a fresh Dynamo and plan cache per test


def randomise_norms(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Norm layers' affine parameters (and BN statistics) drawn at random: none zero-initialised, none trivial."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def eligible_convs(model: nn.Module, run) -> set:
    """Names of the conv modules a separable pair can replace (1-D/2-D, groups=1, more than one tap) that ``run``
    calls: what a full-rank rewrite must rewrite, found with forward hooks, not with dsrewrite."""
    called, hooks = set(), []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1 and math.prod(m.kernel_size) > 1:
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: called.add(name)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hooks:
            h.remove()
    return called


def dsrewrite_warnings(record) -> list:
    return [str(w.message) for w in record if str(w.message).startswith("dsrewrite:")]


def check_full_rank(model: nn.Module, make_inputs, out, gen: torch.Generator, compiler: str = "eager"):
    """Compile ``model`` with the dsrewrite backend at full rank (options as torch.compile passes them), compare
    with the original on two fresh inputs, check what was rewritten; returns the report."""
    want = eligible_convs(model, lambda m: out(m, make_inputs(gen)))
    assert want, "the model has no conv a pair can replace: the test would prove nothing"
    compiled = torch.compile(model, backend="dsrewrite", options={"rank": "full", "compiler": compiler})
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):  # the compile input, then another fresh one through the same compiled graph
            inputs = make_inputs(gen)
            err = rel_err(out(compiled, inputs), out(model, inputs))
            assert err < TOL, err
    assert not dsrewrite_warnings(record), dsrewrite_warnings(record)
    rep = last_report()
    assert rep.route == "torch.compile"
    assert {L.name for L in rep.rewritten} == want  # every eligible conv, under the name rewrite() gives it
    assert all(L.reason for L in rep.skipped)
    return rep


# ---------------------------------------------------------------------------------------------- models
def test_diffusers_unet2d(gen):
    """The issue's case: diffusers' ModelMixin has its own __getattr__, so Dynamo reaches parameters through
    ``L['self'].__dict__['_modules']...``, which lifting read as a module named '__dict__'."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = randomise_norms(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")), gen)
    rep = check_full_rank(model, lambda g: (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])),
                          lambda m, a: m(*a).sample, gen)
    assert "conv_in" in {L.name for L in rep.rewritten}


def test_diffusers_autoencoder_kl(gen):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = randomise_norms(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2), gen)
    check_full_rank(model, lambda g: (torch.randn(1, 3, 8, 8, generator=g),),
                    lambda m, a: m(*a, sample_posterior=False).sample, gen)


def test_transformers_wav2vec2(gen):
    """1-D convs (feature extractor); the weight-normed, grouped positional conv is left alone with its reason."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cfg = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                      conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    model = randomise_norms(transformers.Wav2Vec2Model(cfg), gen)
    rep = check_full_rank(model, lambda g: (torch.randn(1, 400, generator=g),),
                          lambda m, a: m(*a).last_hidden_state, gen)
    skipped = {L.name: L.reason for L in rep.skipped}
    assert "groups=2" in skipped["encoder.pos_conv_embed.conv"]


def test_transformers_whisper_encoder_under_inductor(gen):
    """Conv1d stem read by the encoder around the call (conv1.stride); compiled by Inductor."""
    pytest.importorskip("transformers")
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cfg = WhisperConfig(num_mel_bins=8, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                        max_source_positions=16)
    model = randomise_norms(WhisperEncoder(cfg), gen)
    check_full_rank(model, lambda g: (torch.randn(1, 8, 32, generator=g),), lambda m, a: m(*a).last_hidden_state,
                    gen, compiler="inductor")


def test_segmentation_models_unet(gen):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = randomise_norms(smp.Unet("resnet18", encoder_weights=None, encoder_depth=3,
                                     decoder_channels=(16, 8, 8), classes=2), gen)
    check_full_rank(model, lambda g: (torch.randn(1, 3, 32, 32, generator=g),), lambda m, a: m(*a), gen)


def test_timm_tf_same_padding(gen):
    """timm's Conv2dSame (TF 'same' padding computed from the input size, then F.conv2d)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = randomise_norms(timm.create_model("test_efficientnet", pretrained=False, num_classes=4,
                                              pad_type="same"), gen)
    assert any(type(m).__name__ == "Conv2dSame" for m in model.modules())
    check_full_rank(model, lambda g: (torch.randn(1, 3, 30, 30, generator=g),), lambda m, a: m(*a), gen)


# ---------------------------------------------------------------------------------------------- never fails
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c = nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def test_a_failing_pass_compiles_the_graph_unchanged_with_one_warning(monkeypatch, gen):
    """A bug inside the pass (here: the planner raising) leaves the graph as captured, compiled by Inductor; the
    compile succeeds, equals the original, and says why once (warning and report note)."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected planner bug")

    monkeypatch.setattr(dynamo_backend, "plan_sites", broken)
    model = Tiny().eval()
    x, x2 = torch.randn(2, 3, 12, 12, generator=gen), torch.randn(2, 3, 12, 12, generator=gen)
    compiled = torch.compile(model, backend="dsrewrite", options={"rank": "full"})
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y, y2 = compiled(x), compiled(x2)  # one compile, two calls
        assert rel_err(y, model(x)) < 1e-5 and rel_err(y2, model(x2)) < 1e-5  # the original graph (Inductor: float
    said = dsrewrite_warnings(record)                                          # sums reordered, about 1e-7)
    assert len(said) == 1 and NOT_REWRITTEN in said[0] and "RuntimeError: injected planner bug" in said[0], said
    assert "\n" not in said[0]
    rep = last_report()
    assert not rep.rewritten and len(rep.notes) == 1 and "injected planner bug" in rep.notes[0]


def test_a_compiler_refusing_the_rewritten_graph_gets_the_captured_one(monkeypatch, gen):
    """If the compiler fails on the rewritten graph (here: any graph holding a separable pair), the graph as
    captured is compiled instead, with one warning."""
    from dsrewrite.modules import SeparableConv2d

    real = dynamo_backend._inner_compiler

    def picky(gm, example_inputs, compiler, mode):
        if any(isinstance(m, SeparableConv2d) for m in gm.modules()):
            raise NotImplementedError("injected compiler refusal")
        return real(gm, example_inputs, compiler, mode)

    monkeypatch.setattr(dynamo_backend, "_inner_compiler", picky)
    model = Tiny().eval()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = torch.compile(model, backend="dsrewrite", options={"rank": 2, "compiler": "eager"})(x)
        assert rel_err(y, model(x)) < 1e-6  # rank 2 would be far off: this is the original graph
    said = dsrewrite_warnings(record)
    assert len(said) == 1 and "could not compile the rewritten graph" in said[0] and "injected" in said[0], said
    assert not last_report().rewritten


def test_a_lifting_failure_leaves_that_conv_alone_with_its_reason(monkeypatch, gen):
    """A conv lifting cannot map (here: building its module raises for conv 'b') stays dense, with the reason
    in the report; the other convs are rewritten, with no warning, and the output equals the original."""
    real = dynamo_inputs._conv_module

    def flaky(dims, weight, bias, hyper):
        if tuple(weight.shape) == (8, 8, 3, 3):
            raise AttributeError("injected lifting bug")
        return real(dims, weight, bias, hyper)

    monkeypatch.setattr(dynamo_inputs, "_conv_module", flaky)
    model = Tiny().eval()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = torch.compile(model, backend="dsrewrite", options={"rank": "full", "compiler": "eager"})(x)
    assert not dsrewrite_warnings(record)
    assert rel_err(y, model(x)) < TOL
    rep = last_report()
    assert {L.name for L in rep.rewritten} == {"a", "c"}
    (b,) = rep.skipped
    assert b.name == "b" and "not lifted" in b.reason and "AttributeError: injected lifting bug" in b.reason


def test_graph_break_pieces_without_convs_do_not_fail_a_budget(gen):
    """Dynamo splits a model at a graph break; a piece with no conv has no FLOPs to budget (it used to fail the
    compile with "the model's FLOPs are unknown"): it is compiled as is, the pieces with convs are planned."""
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.a(x))
            torch._dynamo.graph_break()
            x = x * 2 + 1
            torch._dynamo.graph_break()
            return self.b(x)

    model = Broken().eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        compiled = dsrewrite.compile(model, target_flops=0.7, compiler="eager")
        y = compiled(x)
    reps = compiled.dsrewrite_reports
    assert [sorted(L.name for L in r.rewritten) for r in reps] == [["a"], [], ["b"]]
    assert not reps[1].layers and y.shape == model(x).shape
    assert all(r.flops_after <= 0.7 * r.flops_before for r in (reps[0], reps[2]))


def test_user_errors_still_fail_in_one_line():
    """Bad options are the user's: one DsrewriteError line, not a silent fallback."""
    with pytest.raises(Exception) as info, torch.no_grad():
        torch.compile(Tiny().eval(), backend="dsrewrite", options={"rank": -1, "compiler": "eager"})(
            torch.randn(1, 3, 8, 8))
    inner = getattr(info.value, "inner_exception", None) or info.value
    assert isinstance(inner, dsrewrite.DsrewriteError) and "\n" not in str(inner) and "rank" in str(inner)


def test_calibration_finds_nested_convs_by_their_names(monkeypatch, gen):
    """Calibration looks up patch statistics and the teacher's convs by layer name (``1.0``, not the lifted
    module's path in the graph): the compiled, calibrated model equals rewrite()'s, every layer with its teacher."""
    import dsrewrite.plan.inputs as planning

    found = []
    real = planning.calib_layers

    def spy(teacher, decisions):
        layers, plain = real(teacher, decisions)
        found.append({L.name: L.teacher is not None for L in layers})
        return layers, plain

    monkeypatch.setattr(planning, "calib_layers", spy)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU()),
                          nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()), nn.Conv2d(32, 32, 3)).eval()
    x, cal = torch.randn(2, 8, 12, 12, generator=gen), torch.randn(8, 8, 12, 12, generator=gen)
    with torch.no_grad():
        want = dsrewrite.rewrite(model, x, target_flops=0.6, calibration=cal, measure_time=False)
        compiled = dsrewrite.compile(model, compiler="eager", target_flops=0.6, calibration=cal)
        got = compiled(x)
        assert rel_err(got, want.model(x)) < TOL
    rep = compiled.dsrewrite_reports[0]
    assert [(L.name, L.rank) for L in rep.layers] == [(L.name, L.rank) for L in want.report.layers]
    assert len(found) == 2 and found[0] == found[1] and found[1] and all(found[1].values())  # rewrite(), compile
