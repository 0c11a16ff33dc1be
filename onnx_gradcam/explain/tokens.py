"""Integer inputs [N, T] (tokens, bytes) and arrays: reading .npy files and raw bytes, and plotting
the ids with the map beneath them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import BadInputError
from .overlay import colorize


def load_array(path: str | os.PathLike[str], shape: Sequence[object], dtype: type[np.generic]) -> np.ndarray:
    """One sample of the model's input from a .npy file: the array is the input itself, with or
    without its batch axis (of size 1); static sizes must match, the values must fit `dtype`."""
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"{str(p)!r} is not a readable .npy file ({exc}): to fix this, save it with np.save"
        ) from exc
    if arr.ndim == len(shape):
        if arr.shape[0] != 1:
            raise BadInputError(
                f"{str(p)!r} holds {arr.shape[0]} samples (shape {list(arr.shape)}): to fix this, save one sample "
                "per file, with or without the batch axis"
            )
        arr = arr[0]
    want = (
        "["
        + ", ".join("N" if i == 0 else str(d) if isinstance(d, int) and d > 0 else "?" for i, d in enumerate(shape))
        + "]"
    )
    fixed = [(i, d) for i, d in enumerate(shape[1:]) if isinstance(d, int) and d > 0]
    if arr.ndim != len(shape) - 1 or any(arr.shape[i] != d for i, d in fixed):
        raise BadInputError(
            f"{str(p)!r} holds an array of shape {list(arr.shape)}, but the model's input is {want}: to fix this, "
            "save one sample of that shape (the batch axis may be left out)"
        )
    if np.dtype(dtype).kind in "iu":
        whole = arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr) & (arr == np.round(arr))))
        if arr.dtype.kind not in "iu" and not whole:
            raise BadInputError(
                f"{str(p)!r} holds {arr.dtype} values, but the model reads integer ids: to fix this, save integers"
            )
        info = np.iinfo(np.dtype(dtype))
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BadInputError(f"{str(p)!r} holds values outside {np.dtype(dtype).name}: to fix this, save valid ids")
    elif not np.all(np.isfinite(arr)):
        raise BadInputError(f"{str(p)!r} holds non-finite values: to fix this, save a finite array")
    return np.ascontiguousarray(arr.astype(dtype))


def load_bytes(path: str | os.PathLike[str], count: int, length: int | None, pad: int) -> np.ndarray:
    """The first `count` bytes of a file as ids [length] (int64), padded with `pad` at the end to
    the model's length (`count` itself where the model's length is dynamic)."""
    size = length if length is not None else count
    if count > size:
        raise BadInputError(
            f"--bytes {count} is more than the model reads ({size} bytes per sample): to fix this, give --bytes "
            f"{size} or less"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(count)
    except OSError as exc:
        raise BadInputError(f"cannot read {str(path)!r} ({exc.strerror or exc}): to fix this, check the file") from None
    ids = np.full(size, pad, np.int64)
    ids[: len(data)] = np.frombuffer(data, np.uint8)
    return ids


def array_picture(arr: np.ndarray, layout: str) -> Image.Image:
    """An image input given as an array ([C, H, W] or [H, W, C], normalised), shown for the
    overlay: each channel min-max scaled to 0..255 (grey for one channel)."""
    a = np.asarray(arr, np.float64)
    a = a.transpose(1, 2, 0) if layout == "nchw" else a
    lo, hi = a.min(axis=(0, 1), keepdims=True), a.max(axis=(0, 1), keepdims=True)
    scaled = (a - lo) / np.where(hi > lo, hi - lo, 1.0)
    img = (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img[..., :3]).convert("RGB")


def plot_tokens(ids: np.ndarray, cam: np.ndarray, colormap: str = "jet", per_row: int | None = None) -> Image.Image:
    """The ids in rows, the map beneath each of them as a coloured bar.

    Bytes (every id in 0..255) show as hex with their printable character below (`.` for
    others); other ids as numbers. Each row starts with the offset of its first id.
    """
    ids = np.asarray(ids).reshape(-1)
    heat = np.asarray(cam, np.float64).reshape(-1)
    if heat.size != ids.size:  # a map of another length: resampled to one value per id
        heat = np.interp(np.linspace(0, 1, ids.size), np.linspace(0, 1, max(heat.size, 1)), heat)
    is_bytes = bool(ids.size) and int(ids.min()) >= 0 and int(ids.max()) <= 255
    texts = [f"{int(v):02X}" for v in ids] if is_bytes else [str(int(v)) for v in ids]
    font = ImageFont.load_default(12)
    char_w = max(int(font.getlength(t)) for t in texts) if texts else 14
    cell = char_w + 6
    per_row = per_row or (32 if is_bytes else max(1, 720 // cell))
    rows = max(1, -(-ids.size // per_row))
    label_w = int(font.getlength(f"{ids.size:06d}")) + 10
    text_h, bar_h, gap = 14, 8, 6
    row_h = text_h * (2 if is_bytes else 1) + bar_h + gap
    img = Image.new("RGB", (label_w + per_row * cell + 10, rows * row_h + 10), "white")
    draw = ImageDraw.Draw(img)
    colours = colorize(heat, colormap)
    for k, (text, colour) in enumerate(zip(texts, colours)):
        r, c = divmod(k, per_row)
        x, y = label_w + c * cell, 5 + r * row_h
        if c == 0:
            draw.text((5, y), f"{k:06d}", fill=(110, 110, 110), font=font)
        draw.text((x + 3, y), text, fill="black", font=font)
        if is_bytes:
            ch = chr(int(ids[k]))
            draw.text((x + 3, y + text_h), ch if 32 <= int(ids[k]) < 127 else ".", fill=(90, 90, 90), font=font)
        top = y + text_h * (2 if is_bytes else 1)
        draw.rectangle([x, top, x + cell - 1, top + bar_h - 1], fill=tuple(int(v) for v in colour))
    return img
