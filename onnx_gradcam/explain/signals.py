"""1-D inputs: reading signals (.npy, .csv) and plotting a signal with its map beneath it.

The plot is drawn by matplotlib (axes, labels) where the report extra is installed; the core
install, whose `explain` command takes signals too, keeps a plain Pillow drawing of the same layout."""

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
    """The signal's channels as lines, the map (resampled to the signal's length) as a strip below,
    `width` x 300 px: by matplotlib with axes and labels when it is installed, else by Pillow."""
    try:
        import matplotlib  # noqa: F401  (the report extra)
    except ImportError:
        return plot_signal_pillow(signal, cam, colormap, width)
    return plot_signal_matplotlib(signal, cam, colormap, width)


def plot_signal_matplotlib(signal: np.ndarray, cam: np.ndarray, colormap: str = "jet", width: int = 800) -> Image.Image:
    """Two axes sharing the time axis: the channels (value against time step), and the map as a
    colour strip in the package's own colormap (explain/overlay.py), with a colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    c, t = signal.shape
    fig = Figure(figsize=(width / 100, 3.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[4, 1], width_ratios=[40, 1], hspace=0.08, wspace=0.02)
    ax = fig.add_subplot(grid[0, 0])
    strip = fig.add_subplot(grid[1, 0], sharex=ax)
    steps = np.arange(t)
    for k in range(c):
        ax.plot(steps, signal[k], linewidth=1.2, label=f"channel {k}")
    ax.set_ylabel("value")
    ax.set_xlim(-0.5, t - 0.5)
    ax.grid(alpha=0.3)
    ax.tick_params(labelbottom=False)
    if 1 < c <= 8:
        ax.legend(fontsize=7, loc="upper right")
    heat = np.interp(np.arange(t), np.linspace(0, t - 1, len(cam)), np.asarray(cam, np.float64))
    table = ListedColormap(colorize(np.linspace(0, 1, 256)[None], colormap)[0] / 255.0)
    shown = strip.imshow(heat[None], aspect="auto", cmap=table, vmin=0, vmax=1, extent=(-0.5, t - 0.5, 0, 1))
    strip.set_yticks([])
    strip.set_xlabel("time step")
    strip.set_ylabel("map", rotation=0, ha="right", va="center")
    bar = fig.colorbar(shown, cax=fig.add_subplot(grid[:, 1]))
    bar.set_label("Grad-CAM")
    fig.subplots_adjust(left=0.08, right=0.93, top=0.96, bottom=0.16)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())


def plot_signal_pillow(signal: np.ndarray, cam: np.ndarray, colormap: str = "jet", width: int = 800) -> Image.Image:
    """The same layout drawn by hand (no axes): lines above, the map's colour strip below."""
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
