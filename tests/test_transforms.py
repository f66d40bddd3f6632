"""The per-sample transforms: reduced JPEG decode, crop-first geometry, modes, depth, captions."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFilter, ImageOps

from sdtrain.data.config import ImageConfig
from sdtrain.data.transforms import (
    CropInfo,
    ImageDecodeError,
    apply_geometry,
    decode_image,
    load_depth,
    load_image,
    masked_images,
    needed_short_side,
    normalize_caption,
    plan_crop,
    reduction_factor,
    to_model_images,
)

# ---------------------------------------------------------------------------------------------
# Helpers: synthetic images and encodings
# ---------------------------------------------------------------------------------------------


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth photo-like RGB image: colour gradients plus blurred ellipses."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            120 + 80 * np.sin(x / width * 3 + 1),
            100 + 90 * np.cos(y / height * 4),
            128 + 60 * np.sin((x + y) / (width + height) * 5),
        ],
        axis=-1,
    )
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(2, max(width, height) // 6 + 3))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(rng.integers(0, 256, 3).tolist()))
    return image.filter(ImageFilter.GaussianBlur(4))


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    if fmt == "JPEG":
        kwargs = {"quality": 90, "subsampling": "4:2:0", **kwargs}
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def reference_crop(source: Image.Image, info: CropInfo, out_h: int, out_w: int) -> np.ndarray:
    """Full-resolution LANCZOS resize of exactly the planned window (the quality ceiling)."""
    top, left, height, width = info.window
    box = (left, top, left + width, top + height)
    return np.asarray(source.resize((out_w, out_h), Image.Resampling.LANCZOS, box=box))


def quadrants(width: int, height: int) -> Image.Image:
    """Red / green / blue / white quadrants: asymmetric under every flip and rotation."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height // 2))
    image.paste((0, 255, 0), (width // 2, 0, width, height // 2))
    image.paste((0, 0, 255), (0, height // 2, width // 2, height))
    return image


def with_orientation(upright: Image.Image, orientation: int) -> bytes:
    """A JPEG whose stored pixels need EXIF ``orientation`` to display as ``upright``."""
    inverse = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    stored = upright.transpose(inverse[orientation]) if orientation in inverse else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, quality=95, exif=exif.tobytes())


# ---------------------------------------------------------------------------------------------
# Reduced-size decoding
# ---------------------------------------------------------------------------------------------


def test_reduction_factor_rule():
    # 1600x1200 to 512: short side 1200 -> /2 = 600 >= 512, /4 = 300 < 512.
    assert needed_short_side(1600, 1200, 512, 512) == 512
    assert reduction_factor(1600, 1200, 512) == 2
    assert reduction_factor(1600, 1200, 256) == 4
    assert reduction_factor(1600, 1200, 150) == 8
    assert reduction_factor(1200, 900, 512) == 1  # 450 < 512: never decode below the target
    assert reduction_factor(1200, 900, 256) == 2
    assert reduction_factor(1201, 1025, 257) == 4  # libjpeg rounds up: ceil(1025 / 4) = 257
    # Non-square crops: the side that binds sets the scale.
    assert needed_short_side(1600, 1200, 512, 768) == 576  # x0.48 -> 768x576
    assert reduction_factor(1600, 1200, 576) == 2
    assert needed_short_side(1600, 1200, 768, 512) == 768  # x0.64 -> 1024x768
    assert reduction_factor(1600, 1200, 768) == 1


@pytest.mark.parametrize(
    ("out_h", "out_w", "decoded_hw"),
    [(512, 512, (600, 800)), (256, 256, (300, 400)), (128, 128, (150, 200)), (768, 768, None)],
)
def test_draft_decodes_at_the_chosen_size(out_h, out_w, decoded_hw):
    data = encode(photo(1600, 1200))
    array, original = decode_image(data, out_h, out_w)
    assert original == (1600, 1200)
    assert array.shape == (*(decoded_hw or (1200, 1600)), 3)
    assert array.dtype == np.uint8 and array.flags.c_contiguous


@pytest.mark.parametrize("kind", ["progressive", "grayscale", "cmyk"])
def test_draft_applies_to_other_jpeg_kinds(kind):
    image = photo(1024, 768)
    if kind == "progressive":
        data = encode(image, progressive=True)
    else:
        data = encode(image.convert("L" if kind == "grayscale" else "CMYK"))
    array, original = decode_image(data, 192, 192)
    assert original == (1024, 768) and array.shape == (192, 256, 3)  # 1/4
    reference = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((256, 192), Image.Resampling.BOX)
    )
    assert psnr(array, reference) >= 30.0


def test_draft_size_rounds_up_for_odd_sizes():
    array, original = decode_image(encode(photo(1601, 1201)), 256, 256)
    assert original == (1601, 1201)
    assert array.shape == (301, 401, 3)  # 1/4: ceil(1201 / 4) = 301 >= 256


# ---------------------------------------------------------------------------------------------
# Output shapes, values, flips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "width"), [(256, 0), (512, 0), (768, 0), (512, 768), (768, 512)])
def test_output_shape_dtype_contiguous(size, width):
    cfg = ImageConfig(size=size, width=width, crop="random", flip_p=0.5)
    image, info = load_image(encode(photo(1000, 700)), cfg, np.random.default_rng(0))
    assert image.shape == (3, size, width or size)
    assert image.dtype == torch.uint8 and image.is_contiguous()
    assert info.original_size == (700, 1000)


def test_solid_colour_survives():
    color = (200, 30, 90)
    for data in (encode(Image.new("RGB", (900, 600), color), "PNG"),):
        image, _ = load_image(data, ImageConfig(size=256), np.random.default_rng(0))
        assert (hwc(image) == np.array(color, np.uint8)).all()
    jpeg = encode(Image.new("RGB", (900, 600), color))
    image, _ = load_image(jpeg, ImageConfig(size=256), np.random.default_rng(0))
    assert np.abs(hwc(image).astype(int) - color).max() <= 2


def test_horizontal_flip():
    source = Image.new("RGB", (600, 300), (255, 0, 0))
    source.paste((0, 0, 255), (300, 0, 600, 300))  # left red, right blue
    data = encode(source, "PNG")
    cfg = ImageConfig(size=256, width=512, crop="center")
    plain, info = load_image(data, cfg, np.random.default_rng(0))
    assert not info.flipped
    assert tuple(plain[:, 128, 10]) == (255, 0, 0) and tuple(plain[:, 128, 500]) == (0, 0, 255)
    flip_cfg = ImageConfig(size=256, width=512, flip_p=1.0, crop="center")
    flipped, info = load_image(data, flip_cfg, np.random.default_rng(0))
    assert info.flipped
    assert tuple(flipped[:, 128, 10]) == (0, 0, 255) and tuple(flipped[:, 128, 500]) == (255, 0, 0)
    assert torch.equal(flipped, plain.flip(-1))


# ---------------------------------------------------------------------------------------------
# Quality against a full-resolution LANCZOS reference of the same window
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "size"), [(1600, 1200, 512), (1200, 900, 256)])
def test_reduced_decode_quality(width, height, size):
    source = photo(width, height, seed=3)
    data = encode(source)
    assert decode_image(data, size, size)[0].shape[0] == height // 2  # really reduced
    full = Image.open(io.BytesIO(data)).convert("RGB")  # full decode, same JPEG
    cfg = ImageConfig(size=size, crop="random")
    for seed in range(3):
        image, info = load_image(data, cfg, np.random.default_rng(seed))
        # Measured ~50 dB against the full decode and ~47 dB against the uncompressed source.
        assert psnr(hwc(image), reference_crop(full, info, size, size)) >= 40.0
        assert psnr(hwc(image), reference_crop(source, info, size, size)) >= 30.0


# ---------------------------------------------------------------------------------------------
# Crop planning
# ---------------------------------------------------------------------------------------------


def test_centre_crop_offsets_exact():
    info = plan_crop(500, 1000, 512, 512, "center", 0.0, np.random.default_rng(0))
    # Resized to 1024x512 (w x h): left = (1024 - 512) / 2 = 256.
    assert info.original_size == (500, 1000)
    assert info.crop_top_left == (0, 256)
    assert info.window == pytest.approx((0.0, 250.0, 500.0, 500.0))
    image, loaded = load_image(
        encode(photo(1000, 500), "PNG"),
        ImageConfig(size=512, crop="center"),
        np.random.default_rng(0),
    )
    assert loaded == info and image.shape == (3, 512, 512)


def test_random_crops_inside_vary_and_repeat():
    data = encode(photo(900, 600))
    cfg = ImageConfig(size=256, crop="random")
    lefts = set()
    for seed in range(40):
        info = plan_crop(600, 900, 256, 256, "random", 0.0, np.random.default_rng(seed))
        top, left = info.crop_top_left
        assert top == 0 and 0 <= left <= 384 - 256  # resized to 384x256
        w_top, w_left, w_h, w_w = info.window
        assert w_top >= 0 and w_left >= 0 and w_top + w_h <= 600 + 1e-6
        assert w_left + w_w <= 900 + 1e-6
        lefts.add(left)
    assert len(lefts) > 10
    first = load_image(data, cfg, np.random.default_rng(7))
    again = load_image(data, cfg, np.random.default_rng(7))
    other = load_image(data, cfg, np.random.default_rng(8))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert first[1] != other[1]


def test_portrait_random_crop_moves_vertically():
    for seed in range(10):
        info = plan_crop(1000, 500, 256, 256, "random", 0.0, np.random.default_rng(seed))
        top, left = info.crop_top_left
        assert left == 0 and 0 <= top <= 512 - 256


def test_apply_geometry_matches_load_image():
    source = photo(640, 480)
    cfg = ImageConfig(size=256, width=320, flip_p=0.5)
    for seed in range(4):
        image, info = load_image(encode(source, "PNG"), cfg, np.random.default_rng(seed))
        same = apply_geometry(np.asarray(source), info, 256, 320)
        assert same.shape == (256, 320, 3) and np.array_equal(same, hwc(image))


# ---------------------------------------------------------------------------------------------
# Modes and EXIF orientation
# ---------------------------------------------------------------------------------------------


def test_grayscale_jpeg_and_png():
    gray = photo(400, 300).convert("L")
    for data in (encode(gray), encode(gray, "PNG")):
        array, _ = decode_image(data, 256, 256)
        assert array.shape == (300, 400, 3)
        assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    array, _ = decode_image(encode(gray, "PNG"), 256, 256)
    assert np.array_equal(array[..., 0], np.asarray(gray))


def test_cmyk_jpeg_to_rgb():
    image = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # red
    image.paste((255, 0, 0, 0), (32, 0, 64, 32))  # cyan
    image.paste((0, 0, 0, 255), (32, 32, 64, 64))  # black
    array, _ = decode_image(encode(image, quality=95), 64, 64)
    assert np.abs(array[8, 8].astype(int) - (255, 0, 0)).max() <= 3
    assert np.abs(array[8, 56].astype(int) - (0, 255, 255)).max() <= 3
    assert np.abs(array[56, 56].astype(int) - (0, 0, 0)).max() <= 3


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_on_white(fmt):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    array, _ = decode_image(encode(image, fmt, transparency=0), 8, 8)
    assert (array[:, :4] == 255).all()
    assert (array[:, 4:] == (200, 100, 50)).all()


def test_alpha_composited_onto_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (10, 200, 30, 0)  # fully transparent -> white
    rgba[:, 8:12] = (10, 200, 30, 255)  # opaque -> unchanged
    rgba[:, 12:] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    array, _ = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 16, 16)
    assert (array[:, :8] == 255).all()
    assert (array[:, 8:12] == (10, 200, 30)).all()
    assert (array[:, 12:] == 127).all()
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    array, _ = decode_image(encode(la, "PNG"), 16, 16)
    assert (array[:, :8] == 255).all() and (array[:, 8:12] == 10).all()


def test_sixteen_bit_grayscale_png():
    values = np.array([[0, 257 * 128, 65535, 1000]], np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    array, _ = decode_image(data, 4, 4)
    assert array.dtype == np.uint8
    assert (array[0, :, 0] == (0, 128, 255, 4)).all()
    assert (array[..., 0] == array[..., 2]).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_exif_transpose(orientation):
    data = with_orientation(quadrants(96, 64), orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    array, original = decode_image(data, 64, 64)
    assert np.array_equal(array, expected)
    assert original == (96, 64)  # upright


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_image_orients_its_output_like_exif_transpose(orientation):
    # load_image crops the stored pixels and orients the small output; the reference orients the
    # full decode first and crops afterwards. Both must agree for every crop and flip.
    data = with_orientation(photo(360, 280, seed=orientation), orientation)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    cfg = ImageConfig(size=192, width=128, crop="random", flip_p=0.5)
    flips = set()
    for seed in range(6):
        image, info = load_image(data, cfg, np.random.default_rng(seed))
        assert info.original_size == upright.shape[:2]
        expected = apply_geometry(upright, info, 192, 128)
        # Same pixels; only the order of the two separable resize passes may round differently.
        assert np.abs(hwc(image).astype(int) - expected).max() <= 2
        flips.add(info.flipped)
    assert flips == {False, True}


def test_exif_rotated_jpeg_is_upright_and_reduced_in_upright_frame():
    # Stored 1600x800 landscape with orientation 6 = an upright 800x1600 portrait.
    data = with_orientation(quadrants(800, 1600), 6)
    assert Image.open(io.BytesIO(data)).size == (1600, 800)
    # Upright, a 512x256 (h x w) crop needs a 256 short side: 1/2 (400) fits, 1/4 (200) does not.
    # In the stored frame the rule would have asked for 512 and decoded at full size.
    array, original = decode_image(data, 512, 256)
    assert original == (800, 1600) and array.shape == (800, 400, 3)
    cfg = ImageConfig(size=512, width=256, crop="center")
    image, info = load_image(data, cfg, np.random.default_rng(0))
    assert info.original_size == (1600, 800)
    corners = {(0, 0): (255, 0, 0), (0, -1): (0, 255, 0), (-1, 0): (0, 0, 255)}
    for (y, x), color in corners.items():
        assert np.abs(image[:, y, x].numpy().astype(int) - color).max() <= 12


# ---------------------------------------------------------------------------------------------
# Corrupt data
# ---------------------------------------------------------------------------------------------


def test_truncated_images_are_never_half_decoded():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    jpeg = encode(photo(640, 480))
    png = encode(photo(640, 480), "PNG")
    for data in (jpeg[: len(jpeg) // 2], png[: len(png) // 2]):
        with pytest.raises(ImageDecodeError, match="cannot decode image"):
            decode_image(data, 256, 256)
        with pytest.raises(ImageDecodeError):
            load_image(data, ImageConfig(size=256), np.random.default_rng(0))


def test_empty_and_random_bytes():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", 256, 256)
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(noise, 256, 256)
    assert issubclass(ImageDecodeError, ValueError)


def test_refuses_when_truncated_loading_enabled(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(photo(64, 64)), 64, 64)


# ---------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------


def normalised(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32)
    return 2 * (values - values.min()) / (values.max() - values.min() + 0.001) - 1


def depth_members(red: np.ndarray) -> dict[str, bytes]:
    """The red channel as a full-size 16-bit PNG and as a half-size float .npy."""
    png = encode(Image.fromarray(red.astype(np.uint16) * 257), "PNG")
    half = Image.fromarray(red).resize((red.shape[1] // 2, red.shape[0] // 2), Image.Resampling.BOX)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(half).astype(np.float32)[None])  # (1, H, W)
    return {"depth.png": png, "depth.npy": buffer.getvalue()}


def test_depth_range_and_alignment_with_image():
    source = photo(800, 600, seed=5)
    red = np.asarray(source)[..., 0]
    members = depth_members(red)
    cfg = ImageConfig(size=256, width=192, crop="random", flip_p=0.5)
    for seed in range(4):
        image, info = load_image(encode(source, "PNG"), cfg, np.random.default_rng(seed))
        target = normalised(image[0].numpy())
        for suffix, data in members.items():
            depth = load_depth(data, suffix, info, 256, 192)
            assert depth.dtype == torch.float32 and depth.shape == (1, 256, 192)
            d = depth[0].numpy()
            assert d.min() == pytest.approx(-1.0, abs=1e-6)
            assert 1 - 0.002 <= d.max() <= 1.0
            tolerance = 0.01 if suffix == "depth.png" else 0.02  # measured 0.001 / 0.006
            assert np.abs(d - target).mean() < tolerance, (seed, suffix)
    # The check has teeth: a depth map cropped for another window does not line up.
    moved = CropInfo(info.original_size, info.crop_top_left, not info.flipped, info.window)
    depth = load_depth(members["depth.png"], "depth.png", moved, 256, 192)
    assert np.abs(depth[0].numpy() - normalised(image[0].numpy())).mean() > 0.05


def test_depth_at_latent_resolution():
    info = plan_crop(600, 800, 512, 512, "center", 0.0, np.random.default_rng(0))
    depth = np.tile(np.arange(800, dtype=np.float32), (600, 1))  # depth = x
    buffer = io.BytesIO()
    np.save(buffer, depth)
    out = load_depth(buffer.getvalue(), ".npy", info, 64, 64)[0].numpy()
    assert out.shape == (64, 64)
    assert (np.diff(out, axis=1) > 0).all()  # still increasing left to right


def test_bad_depth_raises():
    info = plan_crop(8, 8, 8, 8, "center", 0.0, np.random.default_rng(0))
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    nan = io.BytesIO()
    np.save(nan, np.full((8, 8), np.nan, np.float32))
    cases = [
        (b"", "depth.png"),
        (b"not a png at all", "depth.png"),
        (encode(photo(8, 8), "PNG"), "depth.png"),  # RGB is not a depth map
        (b"\x93NUMPY garbage", "depth.npy"),
        (buffer.getvalue(), "depth.npy"),  # pickled objects are refused
        (nan.getvalue(), "depth.npy"),
        (encode(photo(8, 8), "PNG"), "depth.exr"),
    ]
    for data, suffix in cases:
        with pytest.raises(ImageDecodeError):
            load_depth(data, suffix, info, 8, 8)


# ---------------------------------------------------------------------------------------------
# Captions and device-side tensors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  a photo\nof a\tcat  ", "a photo of a cat"),
        ("no\u00a0break\u2003em\r\nspace", "no break em space"),
        ("", ""),
        (" \n\t ", ""),
        ("already clean", "already clean"),
        (b"caf\xc3\xa9\n au lait", "café au lait"),
        (b"bad \xff byte", "bad \ufffd byte"),
    ],
)
def test_normalize_caption(raw, expected):
    assert normalize_caption(raw) == expected


def test_to_model_images_and_masked_images():
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    floats = to_model_images(images)
    assert floats.dtype == torch.float32
    assert floats[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    masks = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    masks[:, :, 0, :] = 1  # top row repainted
    masked = masked_images(floats, masks)
    assert masked.shape == floats.shape
    assert (masked[:, :, 0] == 0).all()
    assert torch.equal(masked[:, :, 1], floats[:, :, 1])
