"""Train the bundled demo model: which shape is in a cluttered picture?

    python tools/train_demo.py [--out models] [--epochs 8]

Synthetic data (fixed seeds): each RGB image, drawn at 96-288 px and resized to 96, holds ONE
object — circle, square, triangle or star — of random colour, size and position, on clutter
(lines, blobs, colour gradients) drawn from the same distribution for every class, so only the
object tells the class. A small CNN
(4 conv blocks, last feature map 12x12, global average pooling, one linear layer) learns it on
2 CPU threads in a few minutes. Exported with the TorchScript exporter, opset 17, dynamic batch,
ImageNet preprocessing (onnx-gradcam's default preset), so `onnx-gradcam explain` needs no flags.
torch is a dev-only dependency; the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle", "star"]
SIZE = 96
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _colour(rs: np.random.RandomState, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rs.randint(lo, hi, 3))  # type: ignore[return-value]


def _clutter(rs: np.random.RandomState, w: int, h: int) -> Image.Image:
    """A background of gradients, lines and small blobs, the same for every class."""
    a, b = np.array(_colour(rs, 40, 220), np.float32), np.array(_colour(rs, 40, 220), np.float32)
    t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    if rs.rand() < 0.5:
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    base = a * (1 - t) + b * t
    base = np.broadcast_to(base, (h, w, 3)) + rs.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    scale = w / SIZE
    for _ in range(rs.randint(6, 14)):
        x0, y0, x1, y1 = (int(v) for v in rs.randint(0, w, 4))
        d.line([x0, y0 * h // w, x1, y1 * h // w], fill=_colour(rs), width=max(1, int(rs.randint(1, 3) * scale)))
    for _ in range(rs.randint(4, 10)):
        x, y, r = rs.randint(0, w), rs.randint(0, h), rs.randint(1, 4) * scale
        d.rectangle([x - r, y - r, x + r, y + r], fill=_colour(rs))
    return img


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = rot + k * math.pi / 5
        pts.append((cx + rad * math.sin(ang), cy - rad * math.cos(ang)))
    return pts


def draw_sample(rs: np.random.RandomState, cls: int, w: int = SIZE, h: int = SIZE) -> tuple[Image.Image, list[int]]:
    """One picture of class `cls`, and the object's box [x0, y0, x1, y1]."""
    img = _clutter(rs, w, h)
    d = ImageDraw.Draw(img)
    scale = min(w, h) / SIZE
    r = rs.uniform(10, 20) * scale
    cx, cy = rs.uniform(r + 2, w - r - 2), rs.uniform(r + 2, h - r - 2)
    fill = _colour(rs)
    outline = tuple(255 - v for v in fill)
    rot = rs.uniform(0, 2 * math.pi)
    if CLASSES[cls] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=max(1, int(2 * scale)))
    elif CLASSES[cls] == "square":
        pts = [(cx + r * math.cos(rot + k * math.pi / 2), cy + r * math.sin(rot + k * math.pi / 2)) for k in range(4)]
        d.polygon(pts, fill=fill, outline=outline, width=max(1, int(2 * scale)))
    elif CLASSES[cls] == "triangle":
        pts = [
            (cx + r * math.cos(rot + k * 2 * math.pi / 3), cy + r * math.sin(rot + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        d.polygon(pts, fill=fill, outline=outline, width=max(1, int(2 * scale)))
    else:
        d.polygon(_star(cx, cy, r * 1.2, rot), fill=fill, outline=outline, width=max(1, int(2 * scale)))
    pad = r * (1.2 if CLASSES[cls] == "star" else 1.0)
    box = [int(max(cx - pad, 0)), int(max(cy - pad, 0)), int(min(cx + pad, w - 1)), int(min(cy + pad, h - 1))]
    return img, box


def to_input(img: Image.Image) -> np.ndarray:
    x = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


SCALES = (1.0, 1.5, 2.0, 3.0)


def dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n pictures drawn at 1-3x the network size and resized to it, as users' photos are."""
    rs = np.random.RandomState(seed)
    labels = np.arange(n) % len(CLASSES)
    xs = []
    for c in labels:
        side = int(SIZE * SCALES[rs.randint(len(SCALES))])
        xs.append(to_input(draw_sample(rs, int(c), side, side)[0]))
    return np.stack(xs).astype(np.float32), labels.astype(np.int64)


def build_model():  # -> torch.nn.Module
    from torch import nn

    def block(cin: int, cout: int, pool: bool) -> list:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(
        *block(3, 24, True),
        *block(24, 48, True),
        *block(48, 64, True),
        *block(64, 96, False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, len(CLASSES)),
    )


def write_samples(out: Path, predict) -> None:  # type: ignore[no-untyped-def]
    """Three sample pictures, 2.7-3.3x the network size (explain resizes them), with their
    objects' boxes in models/demo_boxes.json."""
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(7)
    boxes = {}
    for cls, (w, h) in zip([3, 0, 2], [(288, 288), (320, 320), (256, 256)]):
        img, big_box = draw_sample(rs, cls, w, h)
        name = f"{CLASSES[cls]}.png"
        img.save(samples / name)
        pred = predict(to_input(img)[None])
        print(f"sample {name}: {w}x{h}, box {big_box}, predicted {CLASSES[pred]}")
        if pred != cls:
            raise SystemExit(f"the model misclassifies {name}: change the sample seed")
        boxes[name] = {"class": CLASSES[cls], "box": big_box}
    (out / "demo_boxes.json").write_text(json.dumps(boxes, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "models")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train", type=int, default=6000)
    args = p.parse_args()

    import onnx
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = time.time()
    x_train, y_train = dataset(args.train, seed=1)
    x_test, y_test = dataset(800, seed=2)
    print(f"data: {len(x_train)} train / {len(x_test)} test images in {time.time() - start:.0f} s")
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * (len(x_train) // 64))
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(len(xt) // 64):
            idx = perm[i * 64 : (i + 1) * 64]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f} ({time.time() - start:.0f} s)")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "demo.onnx"
    torch.onnx.export(
        model,
        torch.from_numpy(x_test[:1]),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 8)
    proto.producer_name = "onnx-gradcam tools/train_demo.py"
    onnx.save(proto, str(path))
    (args.out / "labels.txt").write_text("\n".join(CLASSES) + "\n")

    write_samples(args.out, lambda x: int(model(torch.from_numpy(x)).argmax(1)[0]))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB), accuracy {acc:.3f}, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
