"""Calibration data from files, for every route: a folder of images as an array (read with PIL, resized, scaled,
normalised) and a ``.pt`` file of tensors.

The command line's ``--calibration DIR`` (and :func:`dsrewrite.onnx.calib_data.image_feeds`) go through
:func:`load_images`, so images mean the same preprocessing on the PyTorch and ONNX routes: converted to the
input's channel count (grayscale, RGB or BGR), resized to its height and width, scaled to [0, 1], then
``(x - mean) / std`` per channel, in NCHW or NHWC.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DsrewriteError, first_line

__all__ = ["IMAGE_EXTS", "LAYOUTS", "CALIB_FLAGS", "load_images", "image_files", "image_options", "load_tensors"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LAYOUTS = ("nchw", "nhwc")
# the command line's calibration flags (flag, attribute, default): image preprocessing and sequential refits
CALIB_FLAGS = (("--calib-size", "calib_size", None), ("--calib-mean", "calib_mean", None),
               ("--calib-std", "calib_std", None), ("--calib-layout", "calib_layout", "nchw"),
               ("--calib-bgr", "calib_bgr", False), ("--calib-max-images", "calib_max_images", 64),
               ("--sequential/--no-sequential", "sequential", None))


def image_options(args: Any) -> Dict[str, Any]:
    """The image preprocessing flags (``--calib-*`` on a parsed command line) as keyword arguments of the image
    loaders (``size``, ``mean``, ``std``, ``bgr``, ``max_images``)."""
    return {key.replace("calib_", ""): getattr(args, key, default) for _, key, default in CALIB_FLAGS
            if key not in ("calib_layout", "sequential")}


def load_tensors(path: str) -> Any:
    """What a ``.pt`` calibration file holds (a tensor, or a dict of tensors by input name), loaded on the CPU
    without running code (``weights_only``); one line naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a bad or foreign file: one line
        raise DsrewriteError(f"cannot load calibration tensors from {path}: {first_line(e)}") from None


def image_files(folder: str, max_images: Optional[int] = None) -> list:
    """The image files of ``folder`` (sorted), at most ``max_images``; a one-line error when there are none."""
    if not os.path.isdir(folder):
        raise DsrewriteError(f"calibration folder not found: {folder}")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise DsrewriteError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    return [os.path.join(folder, f) for f in files[:max_images]]


def _per_channel(v: Optional[Sequence[float]], c: int, what: str) -> Optional[np.ndarray]:
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    if a.size == 1:
        a = np.repeat(a, c)
    if a.size != c:
        raise DsrewriteError(f"calibration {what} has {a.size} values, the input has {c} channels")
    if what == "std" and (a <= 0).any():
        raise DsrewriteError(f"calibration std must be positive, got {list(a)}")
    return a


def load_images(folder: str, size: Tuple[int, int], channels: int, *, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None, layout: str = "nchw", bgr: bool = False,
                max_images: Optional[int] = 64, preprocess: Optional[Callable] = None) -> np.ndarray:
    """The images of ``folder`` as one float32 array ``[N, C, H, W]`` (``layout="nhwc"``: ``[N, H, W, C]``).

    ``size`` is ``(H, W)``; ``channels`` 1 (grayscale) or 3 (RGB, or BGR with ``bgr``); ``mean`` / ``std``
    per channel (or one value) on the [0, 1] scale. ``preprocess(PIL.Image) -> array`` replaces all of that
    for one image (its arrays are stacked as they are).
    """
    from PIL import Image  # optional dependency (Pillow, which torchvision brings): only image folders need it

    if layout not in LAYOUTS:
        raise DsrewriteError(f"calibration layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    files = image_files(folder, max_images)
    if channels not in (1, 3) and preprocess is None:
        raise DsrewriteError(f"images give 1 or 3 channels, the input has {channels}: give a preprocess "
                             "function or a .npy/.npz/.pt file")
    h, w = (int(s) for s in size)
    m, s = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    out = []
    for path in files:
        try:
            im = Image.open(path)
            if preprocess is not None:
                out.append(np.asarray(preprocess(im), dtype=np.float32))
                continue
            im = im.convert("L" if channels == 1 else "RGB").resize((w, h), Image.BILINEAR)
        except DsrewriteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DsrewriteError(f"cannot read image {os.path.basename(path)}: {first_line(e)}") from None
        a = np.asarray(im, dtype=np.float32).reshape(h, w, channels) / 255.0
        if bgr and channels == 3:
            a = a[..., ::-1]
        if m is not None:
            a = a - m
        if s is not None:
            a = a / s
        out.append(np.ascontiguousarray(a if layout == "nhwc" else a.transpose(2, 0, 1)))
    try:
        return np.stack(out).astype(np.float32, copy=False)
    except ValueError:
        raise DsrewriteError("the preprocess function returned arrays of different shapes: give one size") from None
