"""Load, validate and save ONNX models: one-line errors for bad input, atomic writes, external data both ways.

A model is read with its external data (weights in side files) and written back the same way when the
source used external data or the model is over the 2 GB protobuf limit. Writing goes to a temporary file
in the destination's directory and is moved into place with ``os.replace``, so a failed write never
leaves a half-written model, and the source is only ever replaced when the caller asked for it.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional, Union

import onnx

from ..errors import DsrewriteError, first_line
from .scopes import stored_tensors

__all__ = ["SourceInfo", "load_model", "check_model", "save_model", "same_file", "model_nbytes",
           "uses_external_data", "PROTOBUF_LIMIT", "LARGE"]

# An error's message in a DsrewriteError: all its lines (onnx.checker's span several), at most 300 characters.
_message = functools.partial(first_line, limit=300, joined=True, cut_mark="...")

PROTOBUF_LIMIT = 2**31 - 1  # a serialised ModelProto must stay below 2 GB
LARGE = PROTOBUF_LIMIT - (64 << 20)  # at or above this many bytes a model is handled through its files (margin for edits)
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class SourceInfo:
    """Where a model came from: ``path`` (``None`` for an in-memory ModelProto) and whether it used external data."""

    path: Optional[str]
    external_data: bool = False
    threshold: int = 1024  # bytes from which a tensor went to the external file (the smallest one that did)

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else ""


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether some tensor of the model (subgraphs and Constant nodes included) keeps its data in a side file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored_tensors(model.graph))


def _smallest_external(model: onnx.ModelProto) -> int:
    sizes = []
    for t in stored_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            sizes.append(math.prod(t.dims) * item)
    return min(sizes, default=1024)


def model_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the stored tensors (raw and typed data): a cheap estimate of the serialised size."""
    total = 0
    for t in stored_tensors(model.graph):
        total += len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (
            len(t.int64_data) + len(t.double_data) + len(t.uint64_data))
    return total


def load_model(src: Union[PathLike, onnx.ModelProto]) -> "tuple[onnx.ModelProto, SourceInfo]":
    """Read ``src`` (a path or a ModelProto) with its external data and validate it (see :func:`check_model`)."""
    if isinstance(src, onnx.ModelProto):
        if uses_external_data(src):
            raise DsrewriteError("the ModelProto refers to external data that is not loaded: pass the .onnx path "
                                 "instead, or load it with onnx.load(path) (load_external_data=True)")
        info = SourceInfo(None, False)
        model = src
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise DsrewriteError(f"ONNX file not found: {path}")
        if os.path.isdir(path):
            raise DsrewriteError(f"expected an .onnx file, got a directory: {path}")
        try:
            header = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
            raise DsrewriteError(f"not an ONNX model (truncated or not a protobuf file?): {path}: {_message(e)}") from None
        external = uses_external_data(header)
        threshold = _smallest_external(header) if external else 1024
        model = header
        if external:
            try:
                onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
            except Exception as e:  # noqa: BLE001 - missing or unreadable side file
                raise DsrewriteError(f"cannot read the external data of {path}: {_message(e)}") from None
        info = SourceInfo(path, external, threshold)
    else:
        raise DsrewriteError(f"src must be a path to an .onnx file or an onnx.ModelProto, got {type(src).__name__}")
    check_model(model, info)
    return model, info


def check_model(model: onnx.ModelProto, info: Optional[SourceInfo] = None) -> None:
    """Raise a one-line :class:`DsrewriteError` unless ``model`` is an ONNX model the rewrite can express."""
    where = f" ({info.path})" if info is not None and info.path else ""
    if model.ir_version == 0 and len(model.graph.node) == 0:
        raise DsrewriteError(f"not an ONNX model{where}: no IR version and no graph")
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    newest = onnx.defs.onnx_opset_version()
    if not default:
        raise DsrewriteError(f"the model imports no ai.onnx opset{where}: cannot add Conv nodes to it")
    if default[0] < 1 or default[0] > newest:
        raise DsrewriteError(
            f"ai.onnx opset {default[0]}{where} cannot be expressed with the installed onnx "
            f"(opsets 1..{newest}): upgrade onnx or convert the model with onnx.version_converter")
    try:
        if model_nbytes(model) < LARGE:
            onnx.checker.check_model(model)
        elif info is not None and info.path:
            onnx.checker.check_model(info.path)  # > 2 GB: the checker reads the file and its side data
    except onnx.checker.ValidationError as e:
        raise DsrewriteError(f"model fails onnx.checker{where}: {_message(e)}") from None
    except Exception as e:  # noqa: BLE001 - e.g. protobuf errors on malformed fields
        raise DsrewriteError(f"model fails onnx.checker{where}: {type(e).__name__}: {_message(e)}") from None


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file (symlinks and relative paths resolved)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def save_model(model: onnx.ModelProto, dst: PathLike, *, external_data: bool = False,
               threshold: int = 1024) -> Optional[str]:
    """Write ``model`` to ``dst`` atomically; returns the external data file's path when one is written.

    External data (``<dst name>.data`` next to ``dst``) is used when ``external_data`` is set or the model
    is too large for one protobuf; tensors of at least ``threshold`` bytes go there. ``model`` itself is not changed (a copy is converted).
    """
    dst = os.fspath(dst)
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise DsrewriteError(f"output folder does not exist: {folder}")
    external = external_data or model_nbytes(model) >= LARGE
    base = os.path.basename(dst)
    tmpdir = tempfile.mkdtemp(prefix=f".{base}.", dir=folder)
    try:
        tmp_model = os.path.join(tmpdir, base)
        data_name = base + ".data"
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=threshold)
            del copy
        else:
            onnx.save_model(model, tmp_model)
        data_path = None
        if external and os.path.exists(os.path.join(tmpdir, data_name)):
            data_path = os.path.join(folder, data_name)
            os.replace(os.path.join(tmpdir, data_name), data_path)  # data first: the model refers to it
        os.replace(tmp_model, dst)
        return data_path
    except OSError as e:
        raise DsrewriteError(f"cannot write {dst}: {e.strerror or _message(e)}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
