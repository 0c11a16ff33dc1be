"""1-D inputs: reading signals (.npy, .csv) and plotting a signal with its map beneath it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import BadInputError
from .overlay import colorize

SIGNAL_SUFFIXES = {".npy", ".csv"}


def load_signal(path: str | os.PathLike[str]) -> np.ndarray:
    """A float32 [channels, length] signal from .npy ([T], [C, T] or [1, C, T]) or .csv (one column per channel)."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif p.suffix.lower() == ".csv":
            arr = np.loadtxt(p, delimiter=",", ndmin=2, dtype=np.float64)
            arr = arr.T if arr.shape[0] >= arr.shape[1] else arr  # rows are time steps
        else:
            raise ValueError(f"suffix {p.suffix!r}")
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"{str(p)!r} is not a readable signal ({exc}): to fix this, pass .npy ([T], [C, T] or [1, C, T]) "
            "or .csv (one column per channel) files"
        ) from exc
    arr = np.asarray(arr, np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:  # saved with the batch axis
        arr = arr[0]
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or not np.all(np.isfinite(arr)):
        raise BadInputError(
            f"{str(p)!r} holds an array of shape {arr.shape} or non-finite values: "
            "to fix this, save a finite [T] or [C, T] array"
        )
    return arr


def plot_signal(signal: np.ndarray, cam: np.ndarray, colormap: str = "jet", width: int = 800) -> Image.Image:
    """The signal's channels as lines, the map (resampled to the signal's length) as a strip below."""
    c, t = signal.shape
    plot_h, strip_h, pad = 200, 40, 10
    img = Image.new("RGB", (width, plot_h + strip_h + 3 * pad), "white")
    draw = ImageDraw.Draw(img)
    xs = np.linspace(pad, width - pad, t)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for k in range(c):
        s = signal[k]
        span = float(s.max() - s.min()) or 1.0
        ys = pad + (1 - (s - s.min()) / span) * (plot_h - 1)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colours[k % len(colours)], width=2)
    heat = np.interp(np.linspace(0, 1, width - 2 * pad), np.linspace(0, 1, len(cam)), np.asarray(cam, np.float64))
    strip = colorize(np.repeat(heat[None], strip_h, axis=0), colormap)
    img.paste(Image.fromarray(strip), (pad, plot_h + 2 * pad))
    return img
