"""app/preprocess.py on real encoded images: decoding, colour, resize, normalisation, refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.bundle import InputSpec
from app.errors import BadImage, PayloadTooLarge
from app.preprocess import Preprocessor
from tests.images import encode, grey, rgb
from tests.malformed import bomb_png, png_header_only, truncated

GREY = InputSpec(height=28, width=28, channels=1, color="L", mean=[0.5], std=[0.25])
RGB = InputSpec(
    height=32, width=32, channels=3, color="RGB", mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]
)


def flat(value: int, size: tuple[int, int] = (10, 10), mode: str = "L") -> Image.Image:
    return Image.new(mode, size, value)


def expected(value: float, spec: InputSpec) -> np.ndarray:
    """The tensor an image of one uniform 8-bit value must give."""
    c = np.array([(value / 255 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)])
    return np.broadcast_to(c[:, None, None], (spec.channels, spec.height, spec.width))[None]


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
def test_output_is_contiguous_float32_nchw(spec):
    tensor = Preprocessor(spec)(encode(rgb(50, 40), "PNG"))
    assert tensor.shape == (1, spec.channels, spec.height, spec.width)
    assert tensor.dtype == np.float32
    assert tensor.flags.c_contiguous


@pytest.mark.parametrize("value", [0, 37, 128, 255])
def test_normalisation_follows_the_manifest(value):
    tensor = Preprocessor(GREY)(encode(flat(value), "PNG"))
    np.testing.assert_allclose(tensor, expected(value, GREY), rtol=1e-6, atol=1e-6)


def test_per_channel_normalisation():
    tensor = Preprocessor(RGB)(encode(Image.new("RGB", (8, 8), (255, 0, 51)), "PNG"))
    for channel, value in enumerate((255, 0, 51)):
        want = (value / 255 - RGB.mean[channel]) / RGB.std[channel]
        np.testing.assert_allclose(tensor[0, channel], want, rtol=1e-6, atol=1e-6)


def test_rgb_into_grey_uses_luma_and_grey_into_rgb_repeats_it():
    colour = Image.new("RGB", (8, 8), (200, 100, 50))
    luma = colour.convert("L").getpixel((0, 0))
    grey_tensor = Preprocessor(GREY)(encode(colour, "PNG"))
    np.testing.assert_allclose(grey_tensor, expected(luma, GREY), rtol=1e-6, atol=1e-6)
    rgb_tensor = Preprocessor(RGB)(encode(flat(90), "PNG"))
    np.testing.assert_allclose(rgb_tensor, expected(90, RGB), rtol=1e-6, atol=1e-6)


def test_sixteen_bit_is_scaled_not_clipped():
    pre = Preprocessor(GREY)
    wide = Image.fromarray(np.full((10, 10), 65535, np.uint16))
    assert Image.open(io.BytesIO(encode(wide, "PNG"))).mode.startswith("I")
    np.testing.assert_array_equal(pre(encode(wide, "PNG")), pre(encode(flat(255), "PNG")))
    # every 8-bit level v stored as v * 257 in 16 bits decodes to v again
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    narrow = Image.fromarray(levels.astype(np.uint8), "L")
    wide = Image.fromarray(levels * 257)
    np.testing.assert_array_equal(pre(encode(wide, "PNG")), pre(encode(narrow, "PNG")))


def test_centre_crop_keeps_the_middle():
    band = np.zeros((28, 84), np.uint8)
    band[:, 28:56] = 255  # white middle third, black sides
    tensor = Preprocessor(GREY)(encode(Image.fromarray(band, "L"), "PNG"))
    np.testing.assert_allclose(tensor, expected(255, GREY), rtol=1e-6, atol=1e-6)


def test_stretch_keeps_everything():
    band = np.zeros((28, 84), np.uint8)
    band[:, 28:56] = 255
    spec = GREY.model_copy(update={"resize": "stretch"})
    tensor = Preprocessor(spec)(encode(Image.fromarray(band, "L"), "PNG"))
    assert tensor[0, 0, :, 0].max() < 0 < tensor[0, 0, :, 14].min()  # black edge, white middle


def test_transparency_is_composited_over_black():
    clear_white = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    tensor = Preprocessor(GREY)(encode(clear_white, "PNG"))
    np.testing.assert_allclose(tensor, expected(0, GREY), rtol=1e-6, atol=1e-6)


def test_palette_with_transparent_index():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 255, 255, 10, 20, 30] + [0] * 762)
    data = encode(palette, "PNG", transparency=1)  # every pixel uses the transparent entry
    assert "transparency" in Image.open(io.BytesIO(data)).info
    tensor = Preprocessor(GREY)(data)
    np.testing.assert_allclose(tensor, expected(0, GREY), rtol=1e-6, atol=1e-6)


def test_animated_gif_uses_the_first_frame():
    frames = [flat(255, (16, 16)), flat(0, (16, 16))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    tensor = Preprocessor(GREY)(data)
    np.testing.assert_allclose(tensor, expected(255, GREY), rtol=1e-6, atol=1e-6)


def test_cmyk_jpeg_decodes():
    data = encode(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    tensor = Preprocessor(GREY)(data)
    assert tensor.shape == (1, 1, 28, 28)
    assert np.isfinite(tensor).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_every_accepted_format(fmt):
    image = grey(28, seed=3)
    tensor = Preprocessor(GREY)(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    if fmt != "JPEG":  # lossless formats give back the exact pixels
        pixels = np.asarray(image, np.float32)
        np.testing.assert_allclose(tensor[0, 0], (pixels / 255 - 0.5) / 0.25, atol=1e-5)


def test_big_jpeg_decodes_at_reduced_scale_straight_to_grey():
    source = rgb(1024, 768, seed=5).resize((64, 48)).resize((1024, 768))  # smooth, JPEG-friendly
    data = encode(source, "JPEG", quality=90)
    pre = Preprocessor(GREY)
    image = pre.open_image(data)
    tensor = pre.to_tensor(image)
    # draft() rewrote the decoder: a DCT-scaled size no smaller than the crop needs, in grey
    assert image.mode == "L"
    assert 28 <= image.size[1] < 768 and image.size[0] < 1024
    assert image.size == (128, 96)  # 1/8 scale is the smallest that still covers 28 rows
    # and the result is close to a full decode followed by the same crop and resize
    full = Image.open(io.BytesIO(data)).convert("L")
    reference = full.resize((28, 28), Image.Resampling.BILINEAR, box=(128, 0, 896, 768))
    want = (np.asarray(reference, np.float32) / 255 - 0.5) / 0.25
    assert np.abs(tensor[0, 0] - want).mean() < 0.1


def test_same_bytes_same_tensor():
    data = encode(rgb(300, 200, seed=9), "JPEG")
    np.testing.assert_array_equal(Preprocessor(GREY)(data), Preprocessor(GREY)(data))


def test_one_pixel_image():
    tensor = Preprocessor(GREY)(encode(flat(255, (1, 1)), "PNG"))
    np.testing.assert_allclose(tensor, expected(255, GREY), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is plain text\n",
        b"<!doctype html><html><body>not a png</body></html>",
        np.random.default_rng(0).bytes(4096),
        truncated(encode(grey(64), "PNG")),
        truncated(encode(rgb(256, 256), "JPEG")),
        png_header_only(0, 0),
        png_header_only(0, 10),
        encode(grey(8), "TIFF"),  # a real image, but not a format we accept
    ],
    ids=["empty", "text", "html", "random", "png-cut", "jpeg-cut", "0x0", "0x10", "tiff"],
)
def test_undecodable_input_is_bad_image(data):
    with pytest.raises(BadImage):
        Preprocessor(GREY)(data)


def test_pixel_limit_is_enforced_from_the_header():
    pre = Preprocessor(GREY, max_pixels=100 * 100)
    with pytest.raises(PayloadTooLarge, match="101x100"):
        pre.open_image(png_header_only(101, 100))  # no pixel data at all: never decoded
    pre.open_image(encode(flat(0, (100, 100)), "PNG"))


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(PayloadTooLarge):
        Preprocessor(GREY).open_image(bomb_png())


def test_bomb_helper_is_a_real_png():
    image = Image.open(io.BytesIO(bomb_png(200)))
    image.load()
    assert image.size == (200, 200) and image.getextrema() == (0, 0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_corrupted_images_only_ever_raise_client_errors():
    """Byte flips and cuts of every format give a tensor or BadImage/PayloadTooLarge, no crash."""
    rng = np.random.default_rng(42)
    pre = Preprocessor(GREY, max_pixels=4_000_000)
    sources = [encode(rgb(40, 30, seed=1), fmt) for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF")]
    sources += [
        encode(Image.new("P", (9, 9)), "PNG", transparency=0),
        encode(rgb(40, 30).convert("CMYK"), "JPEG"),
        encode(Image.new("1", (9, 9)), "BMP"),
    ]
    outcomes = {"decoded": 0, "refused": 0}
    for case in range(600):
        data = bytearray(sources[case % len(sources)])
        # half the cases hit the headers, where the parsers make their decisions
        reach = min(len(data), 64) if case % 2 else len(data)
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, reach))] = int(rng.integers(0, 256))
        if case % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            tensor = pre(bytes(data))
        except (BadImage, PayloadTooLarge):
            outcomes["refused"] += 1
            continue
        outcomes["decoded"] += 1
        assert tensor.shape == (1, 1, 28, 28)
        assert np.isfinite(tensor).all()
    assert min(outcomes.values()) > 50  # both paths were exercised


# -- ImageNet-style inputs: crop fraction, interpolation, NHWC ---------------------------------

IMAGENET = InputSpec(
    height=224,
    width=224,
    channels=3,
    color="RGB",
    crop_fraction=0.875,
    mean=[0.5] * 3,
    std=[0.5] * 3,
)


def framed(width: int, height: int, border: int) -> Image.Image:
    """White inside a black frame `border` pixels wide."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[border : height - border, border : width - border] = 255
    return Image.fromarray(pixels, "RGB")


def test_crop_fraction_cuts_the_frame_that_a_full_crop_keeps():
    # 256 x 256 with a 16-pixel frame: 0.875 keeps the middle 224, all white; 1.0 sees the frame
    data = encode(framed(256, 256, 16), "PNG")
    cropped = Preprocessor(IMAGENET)(data)
    whole = Preprocessor(IMAGENET.model_copy(update={"crop_fraction": 1.0}))(data)
    np.testing.assert_allclose(cropped, 1.0, atol=1e-6)
    assert whole[0, :, 0, 0].max() < -0.9 and whole[0, :, 112, 112].min() > 0.99


def test_crop_fraction_is_shorter_side_to_256_then_centre_224():
    source = rgb(400, 300, seed=3).resize((40, 30)).resize((400, 300))  # smooth
    tensor = Preprocessor(IMAGENET)(encode(source, "PNG"))
    # the reference recipe: shorter side to 256 (300 -> 256, 400 -> 341), centre crop 224
    resized = source.resize((341, 256), Image.Resampling.BILINEAR)
    left, top = (341 - 224) // 2, (256 - 224) // 2
    reference = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32)
    want = (reference / 255 - 0.5) / 0.5
    assert np.abs(tensor[0].transpose(1, 2, 0) - want).mean() < 0.02


def test_big_jpeg_with_crop_fraction_still_decodes_at_reduced_scale():
    source = rgb(2048, 1536, seed=4).resize((64, 48)).resize((2048, 1536))
    data = encode(source, "JPEG", quality=90)
    pre = Preprocessor(IMAGENET)
    image = pre.open_image(data)
    tensor = pre.to_tensor(image)
    # the crop is 0.875 x 1536 = 1344 rows; at 1/4 scale it is 336 >= 224, at 1/8 only 168
    assert image.size == (512, 384)
    full = Preprocessor(IMAGENET)(encode(source, "PNG"))
    assert np.abs(tensor - full).mean() < 0.05


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_interpolation_follows_the_manifest(interpolation):
    source = rgb(97, 97, seed=6)
    spec = IMAGENET.model_copy(update={"crop_fraction": 1.0, "interpolation": interpolation})
    tensor = Preprocessor(spec)(encode(source, "PNG"))
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    reference = np.asarray(source.resize((224, 224), filters[interpolation]), np.float32)
    np.testing.assert_allclose(
        tensor[0].transpose(1, 2, 0), (reference / 255 - 0.5) / 0.5, atol=1e-5
    )


def test_bicubic_and_bilinear_differ():
    data = encode(rgb(97, 97, seed=6), "PNG")
    spec = IMAGENET.model_copy(update={"interpolation": "bicubic"})
    assert np.abs(Preprocessor(spec)(data) - Preprocessor(IMAGENET)(data)).max() > 0.1


@pytest.mark.parametrize("spec", [GREY, RGB, IMAGENET], ids=["grey", "rgb", "imagenet"])
def test_nhwc_is_nchw_transposed_and_contiguous(spec):
    data = encode(rgb(300, 200, seed=8), "JPEG")
    nchw = Preprocessor(spec)(data)
    nhwc = Preprocessor(spec.model_copy(update={"layout": "NHWC"}))(data)
    assert nhwc.shape == (1, spec.height, spec.width, spec.channels)
    assert nhwc.dtype == np.float32 and nhwc.flags.c_contiguous
    np.testing.assert_array_equal(nhwc, nchw.transpose(0, 2, 3, 1))
