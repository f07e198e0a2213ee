"""Backends: write decisions back into a model (torch.fx graph / module tree, ONNX graph) and run the pairs."""
from .triton import triton_forward, triton_supports

__all__ = ["triton_forward", "triton_supports"]
