"""The one definition of preprocessing: encoded image bytes -> float32 NCHW/NHWC, per the manifest.

The service and the offline build's evaluation both call this module, so training-time
evaluation and serving see exactly the same pixels.

Decoding happens in two steps so the service can keep cheap work on the event loop:
`open_image` reads only the header (format, size) and enforces the pixel limit before any
pixel is decoded; `to_tensor` decodes, converts colour, resizes and normalises.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from app.bundle import InputSpec
from app.errors import BadImage, PayloadTooLarge

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
MAGIC_BYTES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not grey pixels
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we enforce our own limit
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class Preprocessor:
    """Manifest-driven preprocessing; one instance per loaded bundle."""

    def __init__(self, spec: InputSpec, max_pixels: int = 40_000_000) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self.size = (spec.width, spec.height)
        self.resample = RESAMPLING[spec.interpolation]
        self.channels_last = spec.layout == "NHWC"
        std = np.asarray(spec.std, dtype=np.float32)
        mean = np.asarray(spec.mean, dtype=np.float32)
        # (x/255 - mean)/std as one multiply-add per element, with a scale and a bias for every
        # element laid out as the tensor is: numpy broadcasting a per-channel pair over a last
        # axis of 3 is ten times slower than one long run over flat arrays.
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        bias = (-mean / std).astype(np.float32)
        spread = np.tile if self.channels_last else np.repeat  # HWC: c0 c1 c2 c0...; CHW: c0 c0...
        self._scale = spread(scale, spec.height * spec.width)
        self._bias = spread(bias, spec.height * spec.width)
        self.sample_shape = spec.sample_shape

    def open_image(self, data: bytes) -> Image.Image:
        """Parse the header only; reject what we will not decode."""
        if not data:
            raise BadImage("empty body: send an encoded JPEG, PNG, WebP, BMP or GIF image")
        try:
            image = Image.open(io.BytesIO(data), formats=sniff_format(data))
        except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice its limit
            limit = min(self.max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0))
            raise PayloadTooLarge(f"image has too many pixels; the limit is {limit}") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise BadImage("not a decodable JPEG, PNG, WebP, BMP or GIF image") from exc
        width, height = image.size
        if width < 1 or height < 1:
            raise BadImage(f"image has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise PayloadTooLarge(
                f"image is {width}x{height} = {width * height} pixels; "
                f"the limit is {self.max_pixels}"
            )
        return image

    def to_tensor(self, image: Image.Image) -> np.ndarray:
        """Decode, convert, resize and normalise one image: float32 [1, C, H, W] or [1, H, W, C]."""
        pixels = self.to_pixels(image)  # HWC
        laid_out = pixels if self.channels_last else pixels.transpose(2, 0, 1)
        tensor = laid_out.astype(np.float32, order="C").reshape(-1)  # a new, contiguous copy
        tensor *= self._scale
        tensor += self._bias
        return tensor.reshape(1, *self.sample_shape)

    def pixels(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> the model's input pixels before normalising: uint8 [H, W, C].

        The offline build trains on these, so its images are exactly what serving normalises.
        """
        return self.to_pixels(self.open_image(data))

    def to_pixels(self, image: Image.Image) -> np.ndarray:
        """Decode, convert and resize one image into uint8 [H, W, C]."""
        spec = self.spec
        box = self._source_box(image.size)
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale (DCT scaling) and straight to grey if asked.
            draft_size = self._draft_size(image.size, box)
            image.draft(spec.color, draft_size)
            box = self._source_box(image.size)
        try:
            image.load()
            image = to_color(image, spec.color)
            if image.size != self.size:
                image = image.resize(self.size, self.resample, box=box)
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(f"image has too many pixels: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise BadImage(f"image data is corrupt or truncated: {exc}") from exc
        # frombuffer over tobytes is cheaper than np.asarray(image), which goes the same way
        width, height = image.size
        return np.frombuffer(image.tobytes(), np.uint8).reshape(height, width, -1)

    def __call__(self, data: bytes) -> np.ndarray:
        return self.to_tensor(self.open_image(data))

    def _source_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The region of the source that maps onto the model input.

        center_crop: the largest centred region of the model's aspect ratio, shrunk by
        crop_fraction; for a square input that is "shorter side to size / crop_fraction, then a
        centre crop of size". stretch: the whole image (its centre crop_fraction per side).
        """
        width, height = size
        crop_w, crop_h = float(width), float(height)
        if self.spec.resize == "center_crop":
            target_aspect = self.size[0] / self.size[1]
            if width / height > target_aspect:  # too wide: crop the sides
                crop_w = height * target_aspect
            else:
                crop_h = width / target_aspect
        fraction = self.spec.crop_fraction
        crop_w, crop_h = crop_w * fraction, crop_h * fraction
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return (left, top, left + crop_w, top + crop_h)

    def _draft_size(
        self, size: tuple[int, int], box: tuple[float, float, float, float]
    ) -> tuple[int, int]:
        """The smallest full-image size whose crop still covers the model input."""
        crop_w, crop_h = box[2] - box[0], box[3] - box[1]
        scale = max(self.size[0] / crop_w, self.size[1] / crop_h)
        return (max(1, int(np.ceil(size[0] * scale))), max(1, int(np.ceil(size[1] * scale))))


def sniff_format(data: bytes) -> tuple[str, ...]:
    """The format the magic bytes announce, so Pillow tries one plugin instead of five."""
    for magic, fmt in MAGIC_BYTES:
        if data.startswith(magic):
            return (fmt,)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP",)
    return ACCEPTED_FORMATS


def to_color(image: Image.Image, color: str) -> Image.Image:
    """Convert any decoded mode to "L" or "RGB"; transparency is composited over black."""
    if image.mode == color:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow clips 16-bit values when converting to 8 bits; scale them instead.
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(wide.astype(np.uint8), "L")
        return image if color == "L" else image.convert(color)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert(color)
    return image.convert(color)
