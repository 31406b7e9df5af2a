"""Torch and ONNX: export, parity, and reading an ONNX graph."""
