"""Compression: channel pruning, quantization-aware training, static INT8."""
