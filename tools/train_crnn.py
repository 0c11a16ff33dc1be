"""Train a tiny CRNN text recogniser on synthetic digit strings, for the recurrent-gradient tests.

    python tools/train_crnn.py [--out .cache/models] [--steps 400]

Data (fixed seeds): 32x128 grayscale images holding 4 digits drawn with PIL's default font at a
random size, gaps and vertical jitter, on a noisy background; each of the 32 output columns
(4 pixels wide) is labelled with the digit covering its centre, or blank (class 10). Model: three
conv blocks (the last, [N, 48, 8, 32], is the Grad-CAM feature map), max-pooled over the height (MaxPool (8, 1))
into a sequence-first [32, N, 48] input of a bidirectional LSTM, a Linear per step; the output is
per-column logits [N, 11, 32] (classes on axis 1, so region_seed's column masks apply). Trained
with cross entropy per column on 1 CPU thread, exported with the TorchScript exporter at opset 17
with a dynamic batch (165 KB; into .cache/models, not committed). Measured: 400 steps in 60-100 s on
the shared 2-core machine, 98.5% of the validation columns right. torch is a dev-only dependency;
the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

H, W, COLUMNS, DIGITS, BLANK = 32, 128, 32, 4, 10
NAME = "crnn_digits.onnx"


def render(rs: np.random.RandomState) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
    """One image [1, 32, 128] in [0, 1], its digits, and each digit's inked pixel columns [x0, x1)."""
    size = int(rs.randint(18, 25))
    font = ImageFont.load_default(size=size)
    digits = [int(d) for d in rs.randint(0, 10, DIGITS)]
    widths = [int(np.ceil(font.getlength(str(d)))) for d in digits]
    inner = 3  # the fewest pixels between two digits
    spare = max(W - 4 - sum(widths) - inner * (DIGITS - 1), 0)
    cuts = np.sort(rs.randint(0, spare + 1, DIGITS))
    gaps = np.diff(np.concatenate([[0], cuts, [spare]]))  # DIGITS + 1 gaps summing to spare
    img = Image.fromarray((rs.uniform(0, 60, (H, W))).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    x, spans = 2 + int(gaps[0]), []
    for i, d in enumerate(digits):
        y = int(rs.randint(0, max(H - size - 2, 1)))
        draw.text((x, y), str(d), fill=int(rs.randint(170, 256)), font=font)
        left, _, right, _ = font.getbbox(str(d))  # the ink, not the advance width
        spans.append((x + int(left), x + int(np.ceil(right))))
        x += widths[i] + inner + int(gaps[i + 1])
    return np.asarray(img, np.float32)[None] / 255.0, digits, spans


def column_labels(digits: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
    """The digit under each output column's centre pixel, else BLANK."""
    labels = np.full(COLUMNS, BLANK, np.int64)
    centres = (np.arange(COLUMNS) + 0.5) * (W / COLUMNS)
    for d, (x0, x1) in zip(digits, spans, strict=True):
        labels[(centres >= x0) & (centres < x1)] = d
    return labels


def dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    rs = np.random.RandomState(seed)
    images, labels, spans = [], [], []
    for _ in range(n):
        img, digits, sp = render(rs)
        images.append(img)
        labels.append(column_labels(digits, sp))
        spans.append(sp)
    return np.stack(images), np.stack(labels), spans


def build():  # type: ignore[no-untyped-def]
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 48, 3, padding=1),
                nn.ReLU(),
            )
            self.pool = nn.MaxPool2d((8, 1))  # over the height: one feature vector per column
            self.lstm = nn.LSTM(48, 32, bidirectional=True)
            self.fc = nn.Linear(64, BLANK + 1)

        def forward(self, x):  # type: ignore[no-untyped-def]
            f = self.features(x)  # [N, 48, 8, 32]
            seq = self.pool(f).squeeze(2).permute(2, 0, 1)  # [T, N, 48]
            y, _ = self.lstm(seq)
            return self.fc(y).permute(1, 2, 0)  # [N, 11, T]

    return CRNN()


def train(out_dir: Path, steps: int = 400, seed: int = 0) -> Path:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x, y, _ = dataset(2000, seed)
    xv, yv, _ = dataset(300, seed + 1)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rs = np.random.RandomState(seed)
    start = time.time()
    for _ in range(steps):  # a fixed number of steps: the same weights on every run
        idx = torch.from_numpy(rs.randint(0, len(x), 64))
        opt.zero_grad()
        loss = loss_fn(net(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / NAME
    torch.onnx.export(
        net,
        torch.from_numpy(x[:1]),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    info = {"steps": steps, "seconds": round(time.time() - start, 1), "column_accuracy": accuracy}
    (out_dir / "crnn_digits.json").write_text(json.dumps(info))
    print(json.dumps(info))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/models"))
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    train(args.out, args.steps)


if __name__ == "__main__":
    main()
