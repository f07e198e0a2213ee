"""Frontends: turn a model (torch.fx graph, eager module tree, ONNX graph) into ConvSite descriptions."""
