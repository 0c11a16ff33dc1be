"""Train a byte-level 1-D CNN on synthetic "file types" and export it to ONNX (int32 input [N, 2048]).

    python tools/train_bytes.py [--out .cache/bytes] [--steps 1200]

Each sample is random bytes with a class's magic number (4 fixed bytes) at a random offset, so
only those 4 bytes tell the class. The network: a byte embedding (nn.Embedding(256, 8)), Conv1d
(k 6, stride 2), a LayerNorm over channels written out (ReduceMean, Sub, Pow, Sqrt, Reciprocal,
Mul, Add), ReLU, a global max pool (nn.AdaptiveMaxPool1d(1)), a linear head. It trains on
256-byte samples (the global pool makes it length-agnostic), 1200 Adam steps of 64 samples on 1 CPU
thread under a fixed seed, in about 10 s (accuracy 1.0 on 256 held-out 2048-byte samples), and is
exported twice with the same function (TorchScript exporter, opset 17, dynamic batch):

- `bytes_gather.onnx`: the embedding as Gather from its table (torch's nn.Embedding); torch writes
  the global max pool as a MaxPool whose window is the whole sequence;
- `bytes_onehot.onnx`: the bytes one-hot by Equal + Cast (as tf2onnx writes a one-hot), the
  embedding folded into the convolution's weights (W'[o, v, k] = Σ_e W[o, e, k] E[v, e]), and
  that MaxPool rewritten as GlobalMaxPool (as tf2onnx writes a global max pool).

torch is a dev-only dependency; the package never imports it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CLASSES = ["pdf", "png", "zip", "elf"]
MAGIC = [b"%PDF", b"\x89PNG", b"PK\x03\x04", b"\x7fELF"]
LENGTH = 2048  # the exported input's length
TRAIN_LENGTH = 256
KERNEL, STRIDE = 6, 2  # the map's resolution: one conv stride, 2 bytes


def samples(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes [n, length] int32, classes [n], magic offsets [n]) under a fixed seed."""
    rs = np.random.RandomState(seed)
    x = rs.randint(0, 256, (n, length)).astype(np.int32)
    y = rs.randint(0, len(CLASSES), n)
    offsets = rs.randint(0, length - 4 + 1, n)
    for i in range(n):
        x[i, offsets[i] : offsets[i] + 4] = np.frombuffer(MAGIC[y[i]], np.uint8)
    return x, y.astype(np.int64), offsets


def build(embedding: str = "gather"):  # -> torch.nn.Module
    """The byte CNN; `embedding` 'gather' (nn.Embedding) or 'onehot' (Equal + Cast, then the
    convolution over 256 one-hot channels)."""
    import torch
    from torch import nn

    class ByteCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.onehot = embedding == "onehot"
            self.embed = nn.Embedding(256, 8)
            self.register_buffer("codes", torch.arange(256, dtype=torch.int32))
            self.conv = nn.Conv1d(256 if self.onehot else 8, 32, KERNEL, stride=STRIDE)
            self.gamma = nn.Parameter(torch.ones(1, 32, 1))
            self.beta = nn.Parameter(torch.zeros(1, 32, 1))
            self.act = nn.ReLU()
            self.pool = nn.AdaptiveMaxPool1d(1)
            self.fc = nn.Linear(32, len(CLASSES))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            if self.onehot:
                e = (ids.unsqueeze(-1) == self.codes).to(self.conv.weight.dtype)  # [N, T, 256]
            else:
                e = self.embed(ids.long())  # [N, T, 8]
            h = self.conv(e.transpose(1, 2))
            mu = h.mean(dim=1, keepdim=True)  # LayerNorm over channels, written out
            d = h - mu
            var = (d**2).mean(dim=1, keepdim=True)
            h = self.act(d * torch.reciprocal(torch.sqrt(var + 1e-5)) * self.gamma + self.beta)
            return self.fc(torch.flatten(self.pool(h), 1))

    return ByteCNN()


def folded_onehot(model):  # -> torch.nn.Module
    """The same function with the bytes one-hot (Equal + Cast) and the embedding in the conv."""
    import torch

    twin = build("onehot")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("conv.")}
    with torch.no_grad():
        weight = torch.einsum("oek,ve->ovk", model.conv.weight, model.embed.weight)
    state.update({"conv.weight": weight, "conv.bias": model.conv.bias.detach().clone()})
    twin.load_state_dict(state)
    return twin.eval()


def train(steps: int = 1200, seed: int = 0):  # -> torch.nn.Module
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = build("gather")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x, y, _ = samples(64, TRAIN_LENGTH, seed=1000 + step)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model, n: int = 256, length: int = LENGTH) -> float:  # type: ignore[no-untyped-def]
    import torch

    x, y, _ = samples(n, length, seed=7)
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model, path: Path, length: int = LENGTH, opset: int = 17, global_pool: bool = False) -> Path:  # type: ignore[no-untyped-def]
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        torch.zeros(1, length, dtype=torch.int32),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["bytes"],
        output_names=["logits"],
        dynamic_axes={"bytes": {0: "batch"}, "logits": {0: "batch"}},
    )
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 8)
    if global_pool:  # the MaxPool over the whole sequence, as GlobalMaxPool
        for node in m.graph.node:
            if node.op_type == "MaxPool":
                node.op_type = "GlobalMaxPool"
                del node.attribute[:]
    onnx.save(m, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/bytes"))
    parser.add_argument("--steps", type=int, default=1200)
    args = parser.parse_args()
    import torch

    start = time.perf_counter()
    model = train(args.steps)
    print(f"trained in {time.perf_counter() - start:.1f} s; accuracy at {LENGTH} bytes: {accuracy(model):.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "bytes.pt")
    export(model, args.out / "bytes_gather.onnx")
    export(folded_onehot(model), args.out / "bytes_onehot.onnx", global_pool=True)
    (args.out / "bytes.labels.txt").write_text("\n".join(CLASSES) + "\n")
    print(f"wrote {args.out}/bytes_gather.onnx, bytes_onehot.onnx")


if __name__ == "__main__":
    main()
