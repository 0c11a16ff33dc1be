"""Feature tensors in every layout (issue 11): channels-last, token grids with a class token,
sequence-first recurrent outputs. Each map is checked against torch autograd at the same tensor,
brought to [N, C, grid] the way pytorch-grad-cam's `reshape_transform` does by hand; a tensor
whose layout the graph does not tell is an error that asks for --layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_gradcam import prepare
from onnx_gradcam.cli import main
from onnx_gradcam.errors import LayerNotFoundError

from .conditioning import per_sample_error, well_conditioned, with_nudged
from .conftest import cpu_session
from .torch_ref import autograd_at, gradcam_reference

torch = pytest.importorskip("torch")
nn = torch.nn

EXACT = 1e-4  # relative to each sample's largest magnitude


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool = True) -> Path:
    axes = {"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}} if dynamic else {}
    torch.onnx.export(
        model.eval(),
        x,
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        **axes,
    )
    return path


class _Probe(nn.Module):
    """The identity, as a module whose output torch hooks can read (and replace)."""

    def forward(self, y):  # type: ignore[no-untyped-def]
        return y


class CRNN(nn.Module):
    """A text recogniser in miniature: Conv -> ReLU -> MaxPool, the columns as a sequence-first
    [T, N, C] LSTM input, the last step's output -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d((4, 1)))
        self.lstm = nn.LSTM(16, 12)
        self.sequence = _Probe()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):  # type: ignore[no-untyped-def]
        f = self.conv(x)  # [N, 8, 2, W]
        seq = f.reshape(f.shape[0], 16, f.shape[3]).permute(2, 0, 1)  # [T = W, N, 16]
        y, _ = self.lstm(seq)
        return self.fc(self.sequence(y)[-1])  # y: [T, N, 12]


class Block(nn.Module):
    """A pre-norm transformer block as timm writes it: x + attn(norm1(x)), x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):  # type: ignore[no-untyped-def]
        n, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """8x8 patches of a 32x32 image as 16 tokens after a class token, two pre-norm blocks,
    LayerNorm, the class token -> Linear (opset 14 spells LayerNorm out, 17 has the op)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.pos = nn.Parameter(torch.randn(1, 17, 32) * 0.1)
        self.blocks = nn.Sequential(Block(32, 4), Block(32, 4))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):  # type: ignore[no-untyped-def]
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [N, 16, 32]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class ChannelsLast(nn.Module):
    """A channels-last CNN as TensorFlow exports look: [N, H, W, C] input, convolutions between
    transposes, activations and global pooling (ReduceMean over axes 1, 2, keepdims) in NHWC, a
    1x1 convolution on the pooled [N, 1, 1, C] (Keras MobileNetV3's head), then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.features = nn.Hardswish()
        self.head_conv = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = torch.relu(self.conv1(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)  # NHWC
        y = self.features(self.conv2(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # [N, 8, 8, 16]
        pooled = y.mean(dim=(1, 2), keepdim=True)  # [N, 1, 1, 16]
        z = torch.relu(self.head_conv(pooled.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)  # [N, 1, 1, 24]
        return self.fc(z.flatten(1))


def canonical_raw(reference, to_nchw: Callable[[np.ndarray], np.ndarray]):  # type: ignore[no-untyped-def]
    """An autograd_at reference plus Grad-CAM's raw map of its (a, g) brought to [N, C, grid]."""

    def run(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        r = reference(x, dtype)
        r["raw"] = gradcam_reference(to_nchw(r["a"]), to_nchw(r["g"]))
        return r

    return run


def run_prepared(out: Path, x: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    sess = cpu_session(out.read_bytes())
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x, "gradcam_class": classes})))


def score_of(classes: np.ndarray):  # type: ignore[no-untyped-def]
    return lambda out: out[torch.arange(len(classes)), torch.from_numpy(classes)].sum()


def check_against_torch(
    model: torch.nn.Module,
    layer: str,
    got: dict[str, np.ndarray],
    x: np.ndarray,
    classes: np.ndarray,
    to_nchw,
    label: str,
) -> None:  # type: ignore[no-untyped-def]
    head = autograd_at(model, layer, score_of(classes), features=got["gradcam_features"])
    ref = well_conditioned(canonical_raw(head, to_nchw), x, EXACT, label)
    assert per_sample_error(got["gradcam_gradient"], ref["g"]) < EXACT
    assert per_sample_error(got["gradcam_raw"], ref["raw"]) < EXACT


@pytest.mark.parametrize("opset", [12, 17])
@pytest.mark.parametrize("dynamic", [True, False])
def test_sequence_first_lstm_output_gives_a_map_over_the_sequence(tmp_path: Path, opset: int, dynamic: bool) -> None:
    torch.manual_seed(0)
    net = CRNN()
    src = export(net, torch.randn(1, 1, 8, 10), tmp_path / "crnn.onnx", opset, dynamic)
    out = tmp_path / "crnn.gradcam.onnx"
    report = prepare(src, out, expose_gradient=True)
    assert report.feature_layout == "sequence-first" and report.feature_tensor.startswith("/lstm/")
    n = 2 if dynamic else 1
    x = np.random.default_rng(0).random((n, 1, 8, 10)).astype(np.float32)
    classes = np.array([1, 3][:n], np.int64)
    got = run_prepared(out, x, classes)
    assert got["gradcam_raw"].shape == (n, 1, 10)  # one weight per column: the sequence runs along the width
    assert got["gradcam_map"].shape == (n, 8, 10)
    # [T, N, C] -> [N, C, 1, T]: the map's grid, of height 1
    head = autograd_at(net, "sequence", score_of(classes), features=got["gradcam_features"])
    ref = well_conditioned(canonical_raw(head, lambda a: a.transpose(1, 2, 0)[:, :, None, :]), x, EXACT, "crnn")
    assert per_sample_error(np.moveaxis(got["gradcam_gradient"], 1, 0), np.moveaxis(ref["g"], 1, 0)) < EXACT
    assert per_sample_error(got["gradcam_raw"], ref["raw"]) < EXACT
    # --layout sequence-first on the same tensor: the same map
    stated = tmp_path / "stated.gradcam.onnx"
    prepare(src, stated, feature_layer=report.feature_tensor, layout="sequence-first")
    assert np.array_equal(run_prepared(stated, x, classes)["gradcam_raw"], got["gradcam_raw"])
    # the map is constant along the height: the sequence has none
    assert np.allclose(got["gradcam_map"], got["gradcam_map"][:, :1, :], atol=1e-6)


@pytest.mark.parametrize("opset", [14, 17])
def test_class_token_vit_defaults_to_the_last_blocks_norm1_and_matches_torch(tmp_path: Path, opset: int) -> None:
    torch.manual_seed(0)
    net = TinyViT().eval()
    src = export(net, torch.randn(1, 3, 32, 32), tmp_path / "vit.onnx", opset)
    out = tmp_path / "vit.gradcam.onnx"
    report = prepare(src, out, expose_gradient=True)
    assert report.feature_layout == "tokens 1+4x4"
    assert report.feature_tensor.startswith("/blocks/blocks.1/norm1/"), report.feature_tensor
    x = with_nudged(np.random.default_rng(0).random((2, 3, 32, 32)))
    classes = np.array([1, 3, 1, 3], np.int64)
    got = run_prepared(out, x, classes)
    assert got["gradcam_raw"].shape == (4, 4, 4) and got["gradcam_map"].shape == (4, 32, 32)
    # pytorch-grad-cam's reshape_transform for ViT: drop the class token, the grid, channels first
    check_against_torch(
        net,
        "blocks.1.norm1",
        got,
        x,
        classes,
        lambda a: a[:, 1:].reshape(len(a), 4, 4, -1).transpose(0, 3, 1, 2),
        "vit",
    )
    # --layout tokens on the same tensor finds the same grid (1 class token, 4x4 of the 32x32 image)
    stated = tmp_path / "stated.gradcam.onnx"
    assert prepare(src, stated, feature_layer=report.feature_tensor, layout="tokens").feature_layout == "tokens 1+4x4"
    assert np.array_equal(run_prepared(stated, x, classes)["gradcam_raw"], got["gradcam_raw"])
    # the last block's output carries gradient only on the class token: its map would be empty
    late = tmp_path / "late.gradcam.onnx"
    last = [n.output[0] for n in onnx.load(str(src)).graph.node if n.name.startswith("/blocks/")][-1]
    prepare(src, late, feature_layer=last)
    assert np.all(run_prepared(late, x, classes)["gradcam_raw"] == 0)


def test_channels_last_features_and_no_default_after_global_pooling(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ChannelsLast().eval()
    src = export(net, torch.randn(1, 16, 16, 3), tmp_path / "nhwc.onnx", 17)
    out = tmp_path / "nhwc.gradcam.onnx"
    report = prepare(src, out, expose_gradient=True)
    assert report.feature_layout == "NHWC" and report.layout == "nhwc"
    x = with_nudged(np.random.default_rng(0).random((2, 16, 16, 3)))
    classes = np.array([0, 4, 0, 4], np.int64)
    got = run_prepared(out, x, classes)
    assert got["gradcam_features"].shape == (4, 8, 8, 16)  # the Hardswish in NHWC, not the pooled [N, 1, 1, C]
    assert got["gradcam_raw"].shape == (4, 8, 8) and got["gradcam_map"].shape == (4, 16, 16)
    check_against_torch(net, "features", got, x, classes, lambda a: a.transpose(0, 3, 1, 2), "nhwc")
    # `layers` shows each candidate's layout
    result = CliRunner().invoke(main, ["layers", str(src)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[-2] for line in result.output.splitlines()[2:] if line.strip()}
    assert "NHWC" in rows
    # the pooled tensor named by hand is an error, not a map of one position
    pooled = next(n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type == "ReduceMean")
    with pytest.raises(LayerNotFoundError, match="single position"):
        prepare(src, tmp_path / "pooled.onnx", feature_layer=pooled)


class Mystery(nn.Module):
    """A feature tensor whose axes a Reshape scrambles ([N, 6, 8, 8] -> [N, 8, 8, 6], no transpose):
    the graph cannot say which axis is which."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.features = _Probe()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.features(torch.relu(self.conv(x)).reshape(x.shape[0], 8, 8, 6))
        return self.fc(y.mean(dim=(1, 2)))


def test_an_unknown_layout_is_an_error_that_asks_for_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Mystery().eval()
    src = export(net, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", 17)
    scrambled = next(n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type == "Reshape")
    report = prepare(src, tmp_path / "default.onnx")
    assert report.feature_tensor != scrambled and report.feature_layout == "NCHW"  # never the default
    with pytest.raises(LayerNotFoundError, match="--layout"):
        prepare(src, tmp_path / "e.onnx", feature_layer=scrambled)
    assert not (tmp_path / "e.onnx").exists()
    args = ["prepare", str(src), "-o", str(tmp_path / "e.onnx"), "--feature-layer", scrambled]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "--layout" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e.onnx").exists()
    # stated by the user, the map is what that layout gives
    result = CliRunner().invoke(main, [*args, "--layout", "nhwc", "--expose-gradient"])
    assert result.exit_code == 0, result.output
    x = with_nudged(np.random.default_rng(0).random((2, 3, 8, 8)))
    classes = np.array([0, 3, 0, 3], np.int64)
    got = run_prepared(tmp_path / "e.onnx", x, classes)
    assert got["gradcam_raw"].shape == (4, 8, 8)
    check_against_torch(net, "features", got, x, classes, lambda a: a.transpose(0, 3, 1, 2), "read as nhwc")
