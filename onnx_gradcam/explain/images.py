"""Finding and reading images: files, folders (recursive), globs; any Pillow format, any mode."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import BadInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


def collect_inputs(
    inputs: Iterable[str | os.PathLike[str]],
    suffixes: set[str] | None = None,
    exclude: str | os.PathLike[str] | None = None,
) -> tuple[list[Path], list[str]]:
    """Expand files, folders (recursively, image suffixes only, or `suffixes`; an empty set: every
    file) and globs, in a stable order.

    Folders and globs skip everything under `exclude` (the output folder: a second run over `.`
    must not explain the first run's overlays). Returns (files, problems): problems are one-line
    messages for inputs that match nothing.
    """
    wanted = IMAGE_SUFFIXES if suffixes is None else suffixes
    skip = Path(exclude).resolve() if exclude is not None else None

    def keep(q: Path) -> bool:
        return q.is_file() and (skip is None or not q.resolve().is_relative_to(skip))

    files: list[Path] = []
    problems: list[str] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if (not wanted or q.suffix.lower() in wanted) and keep(q))
            if not found:
                problems.append(f"{str(p)!r}: the folder holds no inputs ({', '.join(sorted(wanted)) or 'files'})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(str(raw)):
            found = sorted(Path(q) for q in glob.glob(str(raw), recursive=True) if keep(Path(q)))
            if not found:
                problems.append(f"{str(raw)!r}: the pattern matches no file")
            files.extend(found)
        else:
            problems.append(f"{str(p)!r}: no such file or folder")
    unique: dict[Path, None] = {}
    for f in files:
        unique.setdefault(f, None)
    return list(unique), problems


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """An 8-bit RGB image, EXIF orientation applied; grey, palette, alpha and 16-bit converted.

    Transparent pixels are composited over white; 16-bit and float images are scaled to 8 bits.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            img = opened
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an image that is not turned
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInputError(
            f"{str(path)!r} is not a readable image ({exc}): to fix this, pass JPEG, PNG, BMP, WebP or TIFF files"
        ) from exc
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img
