"""A synthetic evaluation set made like the demo model's samples: pictures with their object's box.

Drawn by tools/train_demo.py's own generator (another seed than training and the bundled samples),
so tests of the evaluation metrics have a trained model with known boxes and more than 3 images.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


def _train_demo():  # -> module
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "tools" / "train_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_demo", module)
    spec.loader.exec_module(module)
    return module


def demo_set(n: int = 32, seed: int = 2026) -> tuple[list[Image.Image], list[int], list[list[int]]]:
    """n pictures (classes in turn, sides 96-288 px as in training), their classes and boxes
    [x0, y0, x1, y1] in each picture's own pixels."""
    td = _train_demo()
    rs = np.random.RandomState(seed)
    images, classes, boxes = [], [], []
    for i in range(n):
        cls = i % len(td.CLASSES)
        side = int(td.SIZE * td.SCALES[rs.randint(len(td.SCALES))])
        img, box = td.draw_sample(rs, cls, side, side)
        images.append(img)
        classes.append(cls)
        boxes.append(box)
    return images, classes, boxes
