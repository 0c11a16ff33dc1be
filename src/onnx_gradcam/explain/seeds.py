"""Seeds for `--target seed` models: dL/d(reduction tensor) for common scores L.

A model prepared with target="seed" takes `gradcam_seed`, shaped like its reduction tensor
(batch first); Grad-CAM then explains L = Σ seed ⊙ reduction per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import BadInputError


def _batch_shape(shape: Sequence[int], batch: int) -> tuple[int, ...]:
    return (batch, *[int(d) for d in shape[1:]])


def class_seed(shape: Sequence[int], cls: int | Sequence[int], batch: int = 1) -> np.ndarray:
    """One-hot at class `cls` on axis 1, everywhere else: L = Σ over positions of class cls's score.

    Example:
        >>> class_seed([1, 21, 4, 4], 3).shape
        (1, 21, 4, 4)
    """
    full = _batch_shape(shape, batch)
    classes = [cls] * full[0] if isinstance(cls, int) else list(cls)
    seed = np.zeros(full, np.float32)
    for i, c in enumerate(classes):
        if not 0 <= c < full[1]:
            raise BadInputError(f"class {c} is out of range: the output has {full[1]} classes")
        seed[i, c] = 1.0
    return seed


def region_seed(shape: Sequence[int], cls: int, mask: np.ndarray | Sequence[int], batch: int = 1) -> np.ndarray:
    """Segmentation: L = Σ of class cls's logits over a region (Vinogradova et al., AAAI 2020).

    `mask` is a boolean [H, W] array (resized, nearest, to the output's spatial size if needed)
    or a box (x0, y0, x1, y1) in the output's pixels, x1 and y1 exclusive.

    Example:
        >>> region_seed([1, 21, 8, 8], 15, (2, 2, 6, 6)).sum()
        16.0
    """
    full = _batch_shape(shape, batch)
    h, w = full[-2], full[-1]
    if isinstance(mask, np.ndarray) and mask.ndim == 2:
        m = mask.astype(bool)
        if m.shape != (h, w):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
    else:
        x0, y0, x1, y1 = (int(v) for v in mask)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise BadInputError(
                f"region {x0},{y0},{x1},{y1} is not inside the {w}x{h} output: to fix this, "
                "give x0,y0,x1,y1 with 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height"
            )
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
    seed = class_seed(full, cls, full[0])
    return seed * m.astype(np.float32)


def box_seed(
    shape: Sequence[int], index: int, cls: int, batch: int = 1, box_axis: int = 1, class_offset: int = 5
) -> np.ndarray:
    """Detection heads shaped [N, boxes, class_offset + classes] (YOLO: x, y, w, h, objectness,
    then class scores): L = the class score of box `index`. `box_axis` says where the boxes are;
    `class_offset` where the class scores start on the last axis.

    Example:
        >>> box_seed([1, 100, 85], index=7, cls=2)[0, 7, 7]
        1.0
    """
    full = _batch_shape(shape, batch)
    seed = np.zeros(full, np.float32)
    if not 0 <= index < full[box_axis]:
        raise BadInputError(f"box {index} is out of range: the head has {full[box_axis]} boxes")
    if not 0 <= class_offset + cls < full[-1]:
        raise BadInputError(f"class {cls} is out of range for {full[-1] - class_offset} classes")
    where: list[int | slice] = [slice(None)] * len(full)
    where[box_axis] = index
    where[-1] = class_offset + cls
    seed[tuple(where)] = 1.0
    return seed


def output_seed(shape: Sequence[int], index: int | Sequence[int], batch: int = 1) -> np.ndarray:
    """Regression: L = output `index` (an int for [N, D], a tuple for higher ranks).

    Example:
        >>> output_seed([1, 2], 1)
        array([[0., 1.]], dtype=float32)
    """
    full = _batch_shape(shape, batch)
    seed = np.zeros(full, np.float32)
    idx = (index,) if isinstance(index, int) else tuple(index)
    try:
        seed[(slice(None),) + idx] = 1.0  # type: ignore[index]
    except IndexError:
        raise BadInputError(f"output {index} is out of range for outputs shaped {list(full[1:])}") from None
    return seed
