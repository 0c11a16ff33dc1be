"""Heat-map colouring and overlays, in NumPy and Pillow (no matplotlib, no OpenCV).

Overlays use 256-entry uint8 lookup tables and uint8 blending; `colorize` keeps the exact float form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from PIL import Image

from ..errors import BadInputError
from .preprocess import RESAMPLE


def _jet(t: np.ndarray) -> np.ndarray:
    # MATLAB's jet: piecewise-linear blue -> cyan -> yellow -> red
    return np.stack([np.clip(1.5 - np.abs(4 * t - k), 0, 1) for k in (3, 2, 1)], axis=-1)


def _turbo(t: np.ndarray) -> np.ndarray:
    # Google's polynomial approximation of Turbo (Mikhailov, 2019)
    r = 0.13572138 + t * (4.6153926 + t * (-42.66032258 + t * (132.13108234 + t * (-152.94239396 + t * 59.28637943))))
    g = 0.09140261 + t * (2.19418839 + t * (4.84296658 + t * (-14.18503333 + t * (4.27729857 + t * 2.82956604))))
    b = 0.1066733 + t * (12.64194608 + t * (-60.58204836 + t * (110.36276771 + t * (-89.90310912 + t * 27.34824973))))
    return np.clip(np.stack([r, g, b], axis=-1), 0, 1)


def _anchors(colours: list[tuple[int, int, int]]) -> Callable[[np.ndarray], np.ndarray]:
    table = np.asarray(colours, np.float64) / 255.0
    xs = np.linspace(0, 1, len(table))

    def cmap(t: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(t, xs, table[:, c]) for c in range(3)], axis=-1)

    return cmap


COLORMAPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jet": _jet,
    "turbo": _turbo,
    "viridis": _anchors(
        [
            (68, 1, 84),
            (72, 40, 120),
            (62, 74, 137),
            (49, 104, 142),
            (38, 130, 142),
            (31, 158, 137),
            (53, 183, 121),
            (109, 205, 89),
            (180, 222, 44),
            (253, 231, 37),
        ]
    ),
    "inferno": _anchors(
        [
            (0, 0, 4),
            (31, 12, 72),
            (85, 15, 109),
            (136, 34, 106),
            (186, 54, 85),
            (227, 89, 51),
            (249, 140, 10),
            (249, 201, 50),
            (252, 255, 164),
        ]
    ),
    "hot": lambda t: np.clip(np.stack([3 * t, 3 * t - 1, 3 * t - 2], axis=-1), 0, 1),
    "gray": lambda t: np.repeat(t[..., None], 3, axis=-1),
}


def colorize(cam: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """uint8 RGB [H, W, 3] of a map whose values lie in [0, 1]."""
    if colormap not in COLORMAPS:
        raise BadInputError(f"unknown colormap {colormap!r}: to fix this, use one of {', '.join(COLORMAPS)}")
    rgb = COLORMAPS[colormap](np.clip(np.asarray(cam, np.float64), 0, 1))
    return (rgb * 255 + 0.5).astype(np.uint8)


def resize_map(cam: np.ndarray, size: tuple[int, int], upsample: str = "bilinear") -> np.ndarray:
    """A [h, w] map resized to size = (width, height), clipped back to [0, 1]."""
    if upsample not in RESAMPLE:
        raise BadInputError(f"unknown --upsample {upsample!r}: to fix this, use one of {', '.join(RESAMPLE)}")
    img = Image.fromarray(np.asarray(cam, np.float32), mode="F")
    return np.clip(np.asarray(img.resize(size, RESAMPLE[upsample]), np.float32), 0, 1)


@functools.cache
def colormap_lut(colormap: str = "jet") -> np.ndarray:
    """uint8 [256, 3]: the colour of t = k / 255 for k = 0..255 (what overlays index with round(255 t))."""
    return colorize(np.linspace(0.0, 1.0, 256), colormap)


def overlay(
    image: Image.Image,
    cam: np.ndarray,
    colormap: str = "jet",
    alpha: float = 0.5,
    upsample: str = "bilinear",
) -> Image.Image:
    """The map, upsampled to the image's own size and coloured, blended over the image.

    out = (1 - alpha) * image + alpha * colormap(map)   (alpha 0.5 and jet, as MATLAB's example)

    The map is resized once (float32) and quantised to 256 levels (round(255 t), clipped to
    [0, 255]), coloured through a 256-entry palette and blended, each step one Pillow operation in C
    (the NumPy form cost 8.7 ms at 500x375, this one 2.8 in BENCHMARKS.md). Against the float64 form this differs
    by at most 2 levels (jet's steepest slope is 4 levels per 1/255; measured in tests/test_pipeline.py).

    Example:
        >>> overlay(Image.open("cat.jpg"), result.maps[0]).save("cat.gradcam.png")
    """
    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"--alpha {alpha} is outside [0, 1]: to fix this, give a value such as 0.5")
    if colormap not in COLORMAPS:
        raise BadInputError(f"unknown colormap {colormap!r}: to fix this, use one of {', '.join(COLORMAPS)}")
    if upsample not in RESAMPLE:
        raise BadInputError(f"unknown --upsample {upsample!r}: to fix this, use one of {', '.join(RESAMPLE)}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    up = Image.fromarray(np.asarray(cam, np.float32), mode="F").resize(rgb.size, RESAMPLE[upsample])
    heat = up.point(lambda t: t * 255.0 + 0.5).convert("L")  # F -> L truncates and clips: round(255 t)
    heat.putpalette(colormap_lut(colormap).tobytes())  # L with a palette is P: index -> colour
    return Image.blend(rgb, heat.convert("RGB"), alpha)


def overlay_float(
    image: Image.Image,
    cam: np.ndarray,
    colormap: str = "jet",
    alpha: float = 0.5,
    upsample: str = "bilinear",
) -> Image.Image:
    """The overlay in float64 colour maps and float32 blending (the form before lookup tables; the
    reference that `overlay` is tested against)."""
    rgb = image.convert("RGB")
    heat = colorize(resize_map(cam, rgb.size, upsample), colormap).astype(np.float32)
    base = np.asarray(rgb, np.float32)
    return Image.fromarray(np.clip((1 - alpha) * base + alpha * heat + 0.5, 0, 255).astype(np.uint8))


def guided_image(gradient: np.ndarray, layout: str = "nchw") -> Image.Image:
    """A Guided Backprop gradient [C, H, W] as a picture, as pytorch-grad-cam's deprocess_image:
    standardise, scale by 0.1, centre at 0.5, clip to [0, 1]."""
    g = np.asarray(gradient, np.float64)
    g = g.transpose(1, 2, 0) if layout == "nchw" else g
    g = (g - g.mean()) / (g.std() + 1e-5) * 0.1 + 0.5
    img = (np.clip(g, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img[..., :3])
