"""Request bodies for the benchmark: Fashion-MNIST test images as PNG (random ones without it)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def grey_images(count: int) -> np.ndarray:
    if FASHION_TEST.exists():
        raw = gzip.decompress(FASHION_TEST.read_bytes())
        return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    return np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def write_bodies(directory: Path, count: int = 256) -> int:
    """Write `count` PNG bodies as 0.bin, 1.bin, ... for the wrk script; returns the count."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(grey_images(count)):
        Image.fromarray(pixels, "L").save(directory / f"{i}.bin", "PNG")
    return count


def write_v2_bodies(directory: Path, source: Path, count: int) -> int:
    """Open Inference Protocol requests for the same images, as a Triton client encodes them.

    Each `i.bin` is a binary-tensor request (JSON header, then the PNG bytes as a BYTES tensor,
    asking for top-5 classification in binary), and `i.headers` carries its per-request header.
    """
    import tritonclient.http as triton

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        png = (source / f"{i}.bin").read_bytes()
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([png], dtype=np.object_), binary_data=True)
        output = triton.InferRequestedOutput("probabilities", binary_data=True, class_count=5)
        body, json_size = triton.InferenceServerClient.generate_request_body(
            [tensor], outputs=[output]
        )
        (directory / f"{i}.bin").write_bytes(body)
        (directory / f"{i}.headers").write_text(
            f"Inference-Header-Content-Length: {json_size}\n" if json_size else ""
        )
    return count
