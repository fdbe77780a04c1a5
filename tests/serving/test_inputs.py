"""Hot-path input checks: every bad input raises InputError with a 4xx status and a clear message."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pcee.serving.inputs import MAX_IMAGE_PIXELS, InputError, array_from_image, arrays_from_json, parse_json_body

SHAPE = (1, 8, 8)


def _err(fn, *a) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*a)
    assert 400 <= info.value.status < 500
    return info.value


def test_single_and_list_of_samples():
    one = np.random.default_rng(0).random(SHAPE)
    x, batched = arrays_from_json({"inputs": one.tolist()}, SHAPE, 16)
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32 and not batched
    x, batched = arrays_from_json({"inputs": [one.tolist(), one.tolist()]}, SHAPE, 16)
    assert x.shape == (2, 1, 8, 8) and batched
    x, batched = arrays_from_json({"inputs": one[0].tolist()}, SHAPE, 16)  # (H, W) for 1 channel
    assert x.shape == (1, 1, 8, 8) and not batched


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"inputs": np.zeros((3, 4, 4)).tolist()}, "wrong shape [3, 4, 4]"),
        ({"inputs": np.zeros((2, 3, 8, 8)).tolist()}, "wrong shape [2, 3, 8, 8]"),
        ({"inputs": np.zeros((8, 7)).tolist()}, "wrong shape"),
        ({"inputs": [[1.0, float("nan")] * 4] * 8}, "NaN/Inf"),
        ({"inputs": [[1.0, float("inf")] * 4] * 8}, "NaN/Inf"),
        ({"inputs": [["a"] * 8] * 8}, "must be numbers"),
        ({"inputs": [[True] * 8] * 8}, "must be numbers"),
        ({"inputs": [[0.1] * 8] * 7 + [[0.1] * 3]}, "ragged"),
        ({"inputs": [[2.0] * 8] * 8}, "out of range"),
        ({"inputs": []}, "non-empty"),
        ({"pixels": [1]}, '"inputs"'),
        ([1, 2, 3], '"inputs"'),
    ],
)
def test_bad_json_inputs(payload, needle):
    err = _err(arrays_from_json, payload, SHAPE, 16)
    assert needle in err.message


def test_too_many_samples():
    err = _err(arrays_from_json, {"inputs": np.zeros((17, 1, 8, 8)).tolist()}, SHAPE, 16)
    assert err.status == 413


def test_empty_and_malformed_json():
    assert "empty body" in _err(parse_json_body, b"").message
    assert "malformed JSON" in _err(parse_json_body, b'{"inputs": [1, 2').message
    assert "malformed JSON" in _err(parse_json_body, b"\xff\xfe").message


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_png_and_jpeg_are_converted_to_dataset_shape():
    rgb = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    x = array_from_image(_png(rgb), SHAPE)
    assert x.shape == (1, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG")
    assert array_from_image(buf.getvalue(), (3, 32, 32)).shape == (1, 3, 32, 32)


def test_non_image_bytes():
    err = _err(array_from_image, b"this is not an image at all", SHAPE)
    assert err.status == 415 and "not an image" in err.message


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR chunk to declare another size (and fix its CRC): a bomb in a few bytes."""
    assert png[12:16] == b"IHDR"
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return png[:16] + bytes(ihdr) + crc + png[33:]


def test_decompression_bomb_declared_size():
    bomb = _patch_png_size(_png(Image.new("L", (8, 8))), 100_000, 100_000)
    err = _err(array_from_image, bomb, SHAPE)
    assert err.status == 413 and ("decompression bomb" in err.message)


def test_decompression_bomb_real_png():
    # a real, valid PNG of 4097x4097 zeros: ~17 MPixels that compress to a few kB
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    bomb = _png(Image.new("1", (side, side)))
    assert len(bomb) < 200_000
    err = _err(array_from_image, bomb, SHAPE)
    assert err.status == 413 and "decompression bomb" in err.message


def test_truncated_png():
    png = _png(Image.new("L", (64, 64), color=7))
    err = _err(array_from_image, png[: len(png) // 2], SHAPE)
    assert "image" in err.message
