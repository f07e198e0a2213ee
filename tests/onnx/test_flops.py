"""Whole-graph FLOPs of an ONNX model agree with torch's FlopCounterMode on the model it was exported from."""
import warnings

import onnx
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsrewrite.onnx import count_flops, count_params, infer_shapes


def export(model: nn.Module, x: torch.Tensor, path, dynamic_batch: bool = False) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(input_names=["x"], output_names=["y"], opset_version=17)
        if dynamic_batch:
            kw["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
        torch.onnx.export(model, (x,), str(path), dynamo=False, **kw)
    return onnx.load(str(path))


class Mixed(nn.Module):
    """Every op family FlopCounterMode counts: conv (grouped, strided, dilated, 1-D), transposed conv,
    linear (addmm), batched matmul; plus ops it does not count (bias adds, pooling, softmax)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c1d = nn.Conv1d(4, 6, 5, padding=2)
        self.fc = nn.Linear(6, 7)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = self.c2(y) + y
        y = self.up(y)  # [N, 4, H, W]
        s = y.flatten(2)  # [N, 4, HW]
        s = self.c1d(s)  # [N, 6, HW]
        att = torch.softmax(s.transpose(1, 2) @ s, dim=-1)  # batched matmul [N, HW, HW]
        return self.fc((att @ s.transpose(1, 2)).mean(1))


def torch_flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model(x)
    return int(c.get_total_flops())


def test_flops_and_params_match_torch(tmp_path):
    model = Mixed().eval()
    x = torch.randn(2, 3, 12, 16)
    m = export(model, x, tmp_path / "m.onnx")
    ops = {n.op_type for n in m.graph.node}
    assert {"Conv", "ConvTranspose", "MatMul", "Gemm"} <= ops, ops
    shapes = infer_shapes(m)
    flops, unknown = count_flops(m, shapes)
    assert unknown == []
    assert not shapes.per_sample
    assert flops == torch_flops(model, x) > 0
    assert count_params(m) == sum(p.numel() for p in model.parameters())


def test_symbolic_batch_counts_per_sample(tmp_path):
    model = Mixed().eval()
    m = export(model, torch.randn(2, 3, 12, 16), tmp_path / "m.onnx", dynamic_batch=True)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # really symbolic
    shapes = infer_shapes(m)
    assert shapes.per_sample and shapes.inputs["x"] == (1, 3, 12, 16)
    assert count_flops(m, shapes)[0] == torch_flops(model, torch.randn(1, 3, 12, 16))
    # static shapes given by the caller: the batch is theirs
    shapes4 = infer_shapes(m, {"x": (4, 3, 12, 16)})
    assert not shapes4.per_sample
    assert count_flops(m, shapes4)[0] == torch_flops(model, torch.randn(4, 3, 12, 16))
    # the caller's model is not changed by fixing the shapes
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_unknown_spatial_dims_are_reported(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    m = onnx.load(str(path))
    shapes = infer_shapes(m)
    flops, unknown = count_flops(m, shapes)
    assert len(unknown) == 1 and flops == 0
    assert any("symbolic dims" in n and "'h'" in n for n in shapes.notes)


def test_bad_input_shapes_are_one_line_errors(tmp_path):
    from dsrewrite.errors import DsrewriteError

    m = export(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(DsrewriteError, match="unknown inputs"):
        infer_shapes(m, {"nope": (1, 3, 8, 8)})
    with pytest.raises(DsrewriteError, match="rank"):
        infer_shapes(m, {"x": (3, 8, 8)})


def test_transposed_conv_rows_count_in_the_totals_convention(tmp_path):
    """A stride-2 ConvTranspose's report row counts its FLOPs over the input positions, as the whole-model total
    (and FlopCounterMode) does: 2 * N * H_in * W_in * Cin * Cout/groups * kh * kw, not 4x that over the output;
    the rows then never sum to more than the total."""
    from dsrewrite.onnx import rewrite

    n, cin, cout, groups, k, h, w = 2, 8, 6, 2, 3, 5, 7
    up = nn.ConvTranspose2d(cin, cout, k, stride=2, padding=1, output_padding=1, groups=groups)
    model = nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), nn.ReLU(), up, nn.Conv2d(cout, 4, 3)).eval()
    x = torch.randn(n, 3, h, w)
    path = tmp_path / "up.onnx"
    m = export(model, x, path)
    assert [node.op_type for node in m.graph.node if "Conv" in node.op_type] == ["Conv", "ConvTranspose", "Conv"]
    _, report = rewrite(str(path), rank="full")
    (row,) = [L for L in report.layers if L.reason and "transposed" in L.reason]
    expected = 2 * n * h * w * cin * (cout // groups) * k * k  # independent: MACs per input position x positions
    assert row.flops_before == expected
    assert row.flops_before == torch_flops(up, torch.randn(n, cin, h, w))  # FlopCounterMode on the layer alone
    assert report.flops_before == torch_flops(model, x)
    assert sum(L.flops_before for L in report.layers) <= report.flops_before
