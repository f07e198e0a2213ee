"""ONNX calibration data (issue 15, first part): feeds checked against the model, and conv inputs collected in
onnxruntime equal to what the PyTorch twin's convs see, on fresh random data."""
import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from dsrewrite.errors import DsrewriteError  # noqa: E402
from dsrewrite.onnx.calib_data import as_feeds, collect_conv_inputs  # noqa: E402
from tests.conftest import np_rng  # noqa: E402


def _twin():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1)).eval()
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(2, 3, 12, 12),), buf, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    return m, onnx.load_from_string(buf.getvalue())


def test_conv_inputs_from_onnxruntime_match_the_pytorch_twin():
    m, model = _twin()
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    data = np_rng().standard_normal((20, 3, 12, 12)).astype(np.float32)
    feeds = as_feeds(data, model, batch_size=8)
    assert [len(f["x"]) for f in feeds] == [8, 8, 4]
    seen = {}
    hooks = [c.register_forward_pre_hook(lambda mod, a, i=i: seen.setdefault(i, []).append(a[0]))
             for i, c in enumerate(c for c in m if isinstance(c, nn.Conv2d))]
    with torch.no_grad():
        m(torch.from_numpy(data[:8]))
    for h in hooks:
        h.remove()
    got = next(collect_conv_inputs(model, feeds, [n.input[0] for n in convs]))
    for i, node in enumerate(convs):
        ref = seen[i][0].numpy()
        assert got[node.input[0]].shape == ref.shape
        assert np.abs(got[node.input[0]] - ref).max() <= 1e-5 * (np.abs(ref).max() + 1)  # fp32, BN folded or not


def test_feeds_from_files_and_dicts(tmp_path):
    _, model = _twin()
    data = np_rng().standard_normal((5, 3, 12, 12)).astype(np.float32)
    np.save(tmp_path / "a.npy", data)
    np.savez(tmp_path / "b.npz", x=data)
    for src in (str(tmp_path / "a.npy"), str(tmp_path / "b.npz"), {"x": data}, [{"x": data[:2]}, {"x": data[2:]}]):
        feeds = as_feeds(src, model, batch_size=4)
        np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), data)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3, 10, 12), np.float32), r"input 'x' has shape 2x3x10x12, the model takes \?x3x12x12"),
    ([{"y": np.zeros((2, 3, 12, 12), np.float32)}], r"calibration feed 0 has inputs \['y'\], the model takes \['x'\]"),
    (np.zeros((0, 3, 12, 12), np.float32), "calibration data is empty"),
    ("no_such_file.npy", "calibration file not found"),
    ([3], "calibration item 0 is a int"),
    (3.5, "calibration must be an array"),
])
def test_bad_calibration_data_is_refused_in_one_line(bad, message):
    _, model = _twin()
    with pytest.raises(DsrewriteError, match=message) as info:
        as_feeds(bad, model)
    assert "\n" not in str(info.value)
