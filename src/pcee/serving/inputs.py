"""Decode and check what a client sends to ``POST /predict``: JSON pixel arrays or an image file.

Hot-path checks are plain numpy (microseconds): shape, numeric dtype, finite, pixel range. The
Great Expectations live-batch suite (``pcee.validation``) checks the same properties on a table
of per-sample summaries, but it costs milliseconds to seconds per call (context, batch
definition, validation result objects), so it belongs to batch validation of the stored traffic
(the monitor / pipeline), not to every request.

Every failure raises :class:`InputError` with an HTTP status and a message naming the problem and
what is accepted.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

#: images larger than this many pixels are refused before decoding (decompression bombs);
#: PIL's own guard is set to the same value, so it raises instead of decoding a bomb.
MAX_IMAGE_PIXELS = 4096 * 4096
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

IMAGE_FORMATS = ("PNG", "JPEG")


class InputError(ValueError):
    """A bad request: ``status`` (4xx) and a message naming the problem."""

    def __init__(
        self, status: int, message: str, problem: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        #: a short, bounded metric label; messages that quote request values (ids, labels) must set it
        self.problem = problem
        self.headers = headers  # e.g. WWW-Authenticate on a 401, Retry-After on a 429


#: integer literals longer than this parse as floats (an int64 has at most 19 digits): a number beyond
#: float64's range becomes inf, which the finite checks refuse, and no digit string reaches Python's
#: int-conversion limit (4300 digits, a ValueError)
MAX_INT_DIGITS = 18


def _int_or_float(text: str) -> int | float:
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else float(text)


def parse_json_body(body: bytes) -> Any:
    """JSON bytes -> Python value, or InputError(400). Every number is an int of at most 18 digits or a
    float64 (inf beyond its range), never a parse failure that escapes as a server error."""
    if not body or not body.strip():
        raise InputError(400, 'empty body: send JSON {"inputs": [...]} or an image file (PNG/JPEG)')
    try:
        return json.loads(body, parse_int=_int_or_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(400, f"malformed JSON: {err}") from None
    except RecursionError:
        raise InputError(400, "malformed JSON: nested too deeply") from None
    except ValueError as err:  # a number json cannot convert
        raise InputError(400, f"malformed JSON: {str(err)[:200]}") from None


def arrays_from_json(payload: Any, input_shape: tuple[int, ...], max_batch: int) -> tuple[np.ndarray, bool]:
    """``{"inputs": A}`` with A one sample (C,H,W) or a list of samples (N,C,H,W) -> (float32 (N,C,H,W),
    whether A was a list of samples).

    For one-channel data a sample may also be given as (H, W) (and a list of them as (N, H, W)).
    """
    if not isinstance(payload, dict) or "inputs" not in payload:
        got = type(payload).__name__ if not isinstance(payload, dict) else f"keys {sorted(payload)[:5]}"
        raise InputError(422, f'JSON body must be an object with key "inputs" (got {got})')
    raw = payload["inputs"]
    if not isinstance(raw, list) or len(raw) == 0:
        raise InputError(
            422, f'"inputs" must be a non-empty array of pixels in shape {list(input_shape)} or a list of them'
        )
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InputError(422, f"inputs are ragged: every sample must have shape {list(input_shape)}") from None
    if arr.dtype == object:
        raise InputError(422, f"inputs are ragged or mixed: every sample must have shape {list(input_shape)}")
    if arr.dtype.kind not in "iuf":
        raise InputError(422, f"inputs must be numbers (ints or floats in [0, 1]), got dtype {_dtype_name(arr)}")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: refused as not finite
        return check_array(arr.astype(np.float32), input_shape, max_batch)


def _dtype_name(arr: np.ndarray) -> str:
    return {"b": "bool", "U": "string", "S": "bytes", "O": "object"}.get(arr.dtype.kind, str(arr.dtype))


def check_array(arr: np.ndarray, input_shape: tuple[int, ...], max_batch: int) -> tuple[np.ndarray, bool]:
    """Shape, finiteness and range checks; returns ((N, C, H, W) float32, whether it was a list)."""
    shape = tuple(input_shape)
    batched = False
    if arr.shape == shape:
        arr = arr[None]
    elif shape[0] == 1 and arr.shape == shape[1:]:
        arr = arr[None, None]
    elif shape[0] == 1 and arr.ndim == 3 and arr.shape[1:] == shape[1:]:
        arr, batched = arr[:, None], True
    elif arr.ndim == len(shape) + 1 and arr.shape[1:] == shape:
        batched = True
    else:
        raise InputError(
            422,
            f"wrong shape {list(arr.shape)}: expected one sample {list(shape)} or a list of samples [N, {', '.join(map(str, shape))}]",
        )
    if arr.shape[0] > max_batch:
        raise InputError(413, f"too many samples in one request: {arr.shape[0]} > {max_batch}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(422, f"inputs contain {bad} NaN/Inf value(s): pixels must be finite numbers in [0, 1]")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(422, f"pixel values out of range [{lo:g}, {hi:g}]: expected floats in [0, 1]")
    return np.ascontiguousarray(arr, dtype=np.float32), batched


def array_from_image(data: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    """Decode a PNG/JPEG into (1, C, H, W) float32 in [0, 1], converted to the dataset's channels and size."""
    if not data:
        raise InputError(400, "empty image upload: send a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            if img.format not in IMAGE_FORMATS:
                raise InputError(415, f"unsupported image format {img.format}: send PNG or JPEG")
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:  # declared size, checked before decoding
                raise InputError(
                    413, f"image too large: {w}x{h} pixels > {MAX_IMAGE_PIXELS} (decompression bomb guard)"
                )
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(413, f"image refused as a decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise InputError(415, "the uploaded bytes are not an image: send a PNG or JPEG file") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt image data
        raise InputError(422, f"corrupt image: {err}") from None
    c, h_out, w_out = input_shape
    if c not in (1, 3):
        raise InputError(422, f"images can feed 1- or 3-channel models only; this model expects {c} channels")
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w_out, h_out):
        img = img.resize((w_out, h_out), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return arr[None]  # (1, C, H, W)
