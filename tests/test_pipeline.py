"""The folder pipeline of `explain` (explain/pipeline.py): the same maps as Explainer.explain, a fixed order,
resuming after a kill, Parquet output, cheaper overlays, and a light start-up."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from onnx_gradcam import Explainer, prepare
from onnx_gradcam.cli import main
from onnx_gradcam.explain.overlay import COLORMAPS, overlay, overlay_float
from onnx_gradcam.explain.pipeline import Job, Reader, RenderOptions, explain_files

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"
SAMPLES = ROOT / "models" / "samples"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def make_images(folder: Path, n: int) -> list[Path]:
    """n JPEGs: the demo's shapes turned by different angles on different greys (different classes and maps)."""
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    shapes = sorted(SAMPLES.glob("*.png"))
    paths = []
    for i in range(n):
        img = Image.open(shapes[i % len(shapes)]).convert("RGB")
        img = img.rotate(i * 7, fillcolor=(int(rs.randint(256)),) * 3).resize((200 + i % 5 * 30, 180))
        paths.append(folder / f"img{i:03d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def output_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "predictions.jsonl"}


def test_folder_maps_equal_a_plain_explain_bit_for_bit(tmp_path: Path) -> None:
    files = make_images(tmp_path / "in", 11)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a picture")  # skipped; the batches after it still match
    code, _, err = run("explain", str(DEMO), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--batch-size", "4")
    assert code == 1 and "broken.jpg" in err and "explained 11 of 12" in err
    entries = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(str(e["file"])).name for e in entries] == [f.name for f in files]  # the files' order
    # the pipeline's batches are [broken, img000..img002], [img003..img006], ...: the same rows per run
    exp = Explainer(DEMO, device="cpu", batch_size=4)
    ref = [exp.explain(files[:3]), exp.explain(files[3:7]), exp.explain(files[7:])]
    raws = np.concatenate([r.raw for r in ref])
    targets = np.concatenate([r.targets for r in ref])
    scores = np.concatenate([r.scores for r in ref])
    assert len(set(targets.tolist())) >= 2  # several classes: a mix-up of rows would show
    for i, e in enumerate(entries):
        assert e["class"] == int(targets[i]) and e["score"] == float(scores[i])
        np.testing.assert_array_equal(np.load(tmp_path / "out" / str(e["raw_map"])), raws[i])


def test_order_and_outputs_do_not_depend_on_threads(tmp_path: Path) -> None:
    files = make_images(tmp_path / "in", 9)
    exp = Explainer(DEMO, device="cpu", batch_size=2)
    outs = []
    for threads in (1, 4):
        out = tmp_path / f"out{threads}"
        out.mkdir()
        summary = explain_files(
            exp,
            Reader(exp),
            files,
            out,
            Job(top_k=2),
            RenderOptions(),
            batch_size=2,
            read_threads=threads,
            render_threads=threads,
        )
        assert summary.explained == 9 and summary.entries == 18
        outs.append(output_files(out))
    assert outs[0] == outs[1]
    entries = json.loads(outs[0]["predictions.json"])
    assert [(Path(str(e["file"])).name, e["rank"]) for e in entries] == [(f.name, r) for f in files for r in (1, 2)]
    # the per-batch steps a worker runs (decoded pictures -> rows and encoded files) give the same bytes
    from onnx_gradcam.explain.images import load_image
    from onnx_gradcam.explain.pipeline import decoded_image, explain_and_render

    batch = [decoded_image(exp, str(f), f.stem, load_image(f)) for f in files[:2]]
    rendered = explain_and_render(exp, batch, Job(top_k=2))
    assert [e for r in rendered for e in r.entries] == entries[:4]
    assert all(outs[0][name] == data for r in rendered for name, data in r.files.items())
    assert len([n for r in rendered for n in r.files]) == 8  # overlay and raw map per input and rank


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict[str, str]]:
    """A prepared demo model, 40 images and the uninterrupted run over them (folder 'whole')."""
    base = tmp_path_factory.mktemp("resume")
    prepare(DEMO, base / "demo.gradcam.onnx")
    make_images(base / "in", 40)
    cmd = [sys.executable, "-m", "onnx_gradcam.cli", "explain", "demo.gradcam.onnx", "in", "--batch-size", "1"]
    cmd += ["--device", "cpu", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([*cmd, "-o", "whole"], cwd=base, env=env, check=True, capture_output=True)
    return base, cmd, env


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
    folder_run: tuple[Path, list[str], dict[str, str]], how: int
) -> None:
    base, cmd, env = folder_run
    cut = base / f"cut{how}"
    proc = subprocess.Popen([*cmd, "-o", cut.name], cwd=base, env=env, stderr=subprocess.PIPE, text=True)
    journal = cut / "predictions.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 4:  # the settings line and 3 inputs
            proc.send_signal(how)
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run ended before it was interrupted"
    if how == signal.SIGINT:
        assert proc.returncode == 130 and "--resume" in err
    settings, *done = journal.read_text().splitlines()
    assert "run" in json.loads(settings) and 3 <= len(done) < 40 and not (cut / "predictions.json").exists()
    for p in cut.iterdir():  # every visible file is whole: a finished file is renamed from a hidden one
        if p.suffix == ".png":
            Image.open(p).load()
        elif p.suffix == ".npy":
            np.load(p)
    for line in done:  # what the journal names exists
        assert (cut / json.loads(line)["overlay"]).is_file()
    again = subprocess.run([*cmd, "-o", cut.name, "--resume"], cwd=base, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"({len(done)} from an earlier run)" in again.stderr
    assert output_files(cut) == output_files(base / "whole")  # predictions.json and every file, byte for byte
    assert not [p for p in cut.iterdir() if p.name.endswith(".tmp")]


def test_resume_refuses_a_folder_from_a_run_with_other_options(
    folder_run: tuple[Path, list[str], dict[str, str]], tmp_path: Path
) -> None:
    """Resuming with another method, format, target or model would mix two runs' outputs in one
    predictions.json: it is refused in one line, and the folder is left as it was."""
    base, cmd, env = folder_run
    cut = tmp_path / "cut"
    subprocess.run([*cmd, "-o", str(cut), "--top-k", "2"], cwd=base, env=env, check=True, capture_output=True)
    (cut / "predictions.json").unlink()  # as if interrupted before the end
    before = {p.name: p.read_bytes() for p in cut.iterdir()}
    other = base / "other.gradcam.onnx"
    if not other.exists():
        prepare(DEMO, other, counterfactual=True)  # the same network, prepared otherwise
    changes = {
        "top_k was 2, now 3": ["--top-k", "3"],
        'render.format was "png", now "jpg"': ["--top-k", "2", "--format", "jpg"],
        'target was null, now "1"': ["--class", "1"],
        'model.counterfactual was "false", now "true"': ["--top-k", "2", "--model-swap"],
    }
    for key, extra in changes.items():
        args = [*cmd, "-o", str(cut), "--resume", *extra]
        if "--model-swap" in extra:
            args = [a if a != "demo.gradcam.onnx" else str(other) for a in args if a != "--model-swap"]
        again = subprocess.run(args, cwd=base, env=env, capture_output=True, text=True)
        assert again.returncode != 0, key
        last = again.stderr.strip().splitlines()[-1]
        assert f"comes from a run with other options ({key})" in last and "leave out --resume" in last, last
        assert {p.name: p.read_bytes() for p in cut.iterdir()} == before, key  # nothing written, nothing cut
    same = subprocess.run([*cmd, "-o", str(cut), "--resume", "--top-k", "2"], cwd=base, env=env, capture_output=True)
    assert same.returncode == 0 and b"(40 from an earlier run)" in same.stderr


def test_formats_no_overlay_and_no_raw(tmp_path: Path) -> None:
    files = make_images(tmp_path / "in", 3)
    code, _, err = run("explain", str(DEMO), *map(str, files), "-o", str(tmp_path / "jpg"), "--format", "jpg")
    assert code == 0, err
    entries = json.loads((tmp_path / "jpg" / "predictions.json").read_text())
    for e, f in zip(entries, files):
        shown = Image.open(tmp_path / "jpg" / str(e["overlay"]))
        assert shown.format == "JPEG" and shown.size == Image.open(f).size
        exp = Explainer(DEMO, device="cpu")
        want = np.asarray(overlay(Image.open(f).convert("RGB"), exp.explain([f]).maps[0]), np.float64)
        assert np.abs(np.asarray(shown.convert("RGB"), np.float64) - want).mean() < 4  # lossy, quality 90
    code, _, err = run(
        "explain", str(DEMO), str(files[0]), "-o", str(tmp_path / "bare"), "--no-overlay", "--no-save-raw"
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["predictions.json", "predictions.jsonl"]
    (entry,) = json.loads((tmp_path / "bare" / "predictions.json").read_text())
    assert entry["overlay"] is None and entry["raw_map"] is None and entry["class"] == entries[0]["class"]


def test_an_input_named_as_an_output_is_refused_and_left_alone(tmp_path: Path) -> None:
    """-o the input folder itself, where an input already bears the name an output would take: a one-line
    error, the input byte for byte as it was; a link there to an input is replaced, not followed."""
    (first,) = make_images(tmp_path / "in", 1)
    code, _, err = run("explain", str(DEMO), str(first), "-o", str(tmp_path / "once"), "--class", "0")
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "once" / "predictions.json").read_text())
    clash = tmp_path / "in" / str(entry["overlay"])  # img000.gradcam.c0.png: an input of the next run
    Image.open(first).save(clash)
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    # files named one by one are explained even inside -o (a folder or glob there would skip them)
    code, _, err = run("explain", str(DEMO), str(first), str(clash), "-o", str(tmp_path / "in"), "--class", "0")
    (error,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and "refusing to overwrite the input image" in error and "choose another -o folder" in error
    assert {name: (tmp_path / "in" / name).read_bytes() for name in before} == before  # the inputs, untouched

    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / str(entry["overlay"])).symlink_to(first)
    code, _, err = run("explain", str(DEMO), str(first), "-o", str(tmp_path / "linked"), "--class", "0")
    assert code == 0, err
    assert first.read_bytes() == before[first.name] and not (tmp_path / "linked" / str(entry["overlay"])).is_symlink()


def test_parquet_holds_the_maps_and_predictions(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    files = make_images(tmp_path / "in", 5)
    code, _, err = run(
        "explain", str(DEMO), str(tmp_path / "in"), "-o", str(tmp_path / "pq"), "--output-format", "parquet"
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["predictions.parquet"]
    table = pq.read_table(tmp_path / "pq" / "predictions.parquet").to_pylist()
    ref = Explainer(DEMO, device="cpu").explain(files)
    assert [Path(r["file"]).name for r in table] == [f.name for f in files]
    for i, row in enumerate(table):
        assert row["class"] == int(ref.targets[i]) and row["score"] == float(ref.scores[i])
        np.testing.assert_array_equal(np.asarray(row["map"], np.float32).reshape(row["map_shape"]), ref.maps[i])
        np.testing.assert_array_equal(np.asarray(row["raw_map"], np.float32).reshape(row["raw_shape"]), ref.raw[i])
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(row["overlay"]))),
            np.asarray(overlay(Image.open(files[i]).convert("RGB"), ref.maps[i])),
        )
    code, _, err = run(
        "explain", str(DEMO), str(files[0]), "-o", str(tmp_path / "pq"), "--output-format", "parquet", "--resume"
    )
    assert code == 1 and "--resume works with --output-format files" in err


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    code, _, err = run(
        "explain", str(DEMO), str(SAMPLES / "star.png"), "-o", str(tmp_path), "--output-format", "parquet"
    )
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: --output-format parquet needs pyarrow")
    assert "pip install 'onnx-gradcam[parquet]'" in err
    assert not list(tmp_path.iterdir())


def test_lookup_table_overlay_is_within_2_levels_of_the_float_one() -> None:
    rs = np.random.RandomState(0)
    image = Image.fromarray(rs.randint(0, 256, (75, 100, 3), np.uint8))
    worst: dict[str, int] = {}
    for colormap in COLORMAPS:
        for alpha in (0.0, 0.3, 0.5, 1.0):
            for _ in range(3):
                cam = rs.rand(7, 7).astype(np.float32)
                new = np.asarray(overlay(image, cam, colormap, alpha), np.int64)
                old = np.asarray(overlay_float(image, cam, colormap, alpha), np.int64)
                key = f"{colormap}@{alpha}"
                worst[key] = max(worst.get(key, 0), int(np.abs(new - old).max()))
    # the default (jet at 0.5) and every map but turbo: 2 levels; turbo's polynomial is steeper (5 at alpha 1)
    assert worst["jet@0.5"] <= 2 and worst["jet@0.0"] == 0
    assert max(v for k, v in worst.items() if not k.startswith("turbo")) <= 2
    assert max(v for k, v in worst.items() if k.startswith("turbo")) <= 5


def _imported(*argv: str) -> set[str]:
    code = (
        "import sys\nfrom onnx_gradcam.cli import main\n"
        f"try:\n    main({list(argv)!r})\nexcept SystemExit:\n    pass\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return set(out.stdout.splitlines()[-1].split()[1:])


def test_help_and_layers_do_not_import_onnxruntime() -> None:
    assert not _imported("--help") & {"onnxruntime", "onnx", "numpy", "PIL"}
    assert not _imported("explain", "--help") & {"onnxruntime", "onnx", "numpy", "PIL"}
    layers = _imported("layers", str(DEMO))
    assert "onnx" in layers and "onnxruntime" not in layers


def test_explaining_a_prepared_file_does_not_load_the_gradient_engine(tmp_path: Path) -> None:
    """Start-up of `explain` on a prepared file: no autodiff rules, no prepare, no self-check modules
    (0.15 s of imports); a plain model, prepared in memory, does load them."""
    prepared = tmp_path / "demo.gradcam.onnx"
    prepare(DEMO, prepared)
    (picture,) = make_images(tmp_path / "in", 1)
    heavy = {"onnx_gradcam.autodiff.registry", "onnx_gradcam.surgery.prepare", "onnx_gradcam.explain.verify"}
    ran = _imported("explain", str(prepared), str(picture), "-o", str(tmp_path / "out"), "--device", "cpu")
    assert (tmp_path / "out" / "predictions.json").is_file() and not ran & heavy
    plain = _imported("explain", str(DEMO), str(picture), "-o", str(tmp_path / "plain"), "--device", "cpu")
    assert (tmp_path / "plain" / "predictions.json").is_file() and heavy <= plain


def test_import_keeps_public_names_and_stays_light() -> None:
    code = (
        "import sys, onnx_gradcam\nlight = 'onnxruntime' not in sys.modules and 'numpy' not in sys.modules\n"
        "names = [getattr(onnx_gradcam, n).__name__ if hasattr(getattr(onnx_gradcam, n), '__name__') else n "
        "for n in onnx_gradcam.__all__]\nprint(light, len(names) == len(onnx_gradcam.__all__) == 23)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_cli_choices_are_the_tables_they_name() -> None:
    from onnx_gradcam import cli
    from onnx_gradcam.explain.pipeline import FORMATS
    from onnx_gradcam.explain.preprocess import RESAMPLE
    from onnx_gradcam.surgery.layout import CHOICES
    from onnx_gradcam.surgery.methods import METHODS
    from onnx_gradcam.surgery.prepare import CLASS_INPUTS, PRESETS

    assert cli.COLORMAP_NAMES == tuple(COLORMAPS) and cli.RESAMPLE_NAMES == tuple(RESAMPLE)
    assert cli.METHOD_NAMES == tuple(METHODS) and cli.CLASS_INPUT_NAMES == tuple(CLASS_INPUTS)
    assert cli.PRESET_NAMES == tuple(PRESETS) and cli.LAYOUT_NAMES == tuple(CHOICES)
    assert cli.FORMAT_NAMES == tuple(FORMATS)
    from onnx_gradcam.evaluation.run import METRICS

    assert cli.METRIC_SUMMARIES == tuple((name, spec.summary) for name, spec in METRICS.items())


def test_fast_png_decodes_to_the_same_pixels_in_every_mode_and_size() -> None:
    from onnx_gradcam.explain.png import encode_png

    rs = np.random.RandomState(1)
    for mode, channels in (("L", 1), ("RGB", 3), ("RGBA", 4)):
        for h, w in ((1, 1), (1, 7), (9, 1), (37, 53)):
            for kind in ("noise", "flat", "ramp"):
                shape = (h, w) if channels == 1 else (h, w, channels)
                if kind == "noise":
                    a = rs.randint(0, 256, shape).astype(np.uint8)
                elif kind == "flat":
                    a = np.full(shape, 255, np.uint8)
                else:  # wraps around 255 -> 0 between rows: the Up filter's modulo arithmetic
                    a = ((np.arange(h * w * channels) * 37) % 256).astype(np.uint8).reshape(shape)
                data = encode_png(Image.fromarray(a, mode))
                with Image.open(io.BytesIO(data)) as back:
                    back.load()  # Pillow checks every chunk's CRC while reading
                    assert back.format == "PNG" and back.mode == mode and back.size == (w, h)
                    assert np.array_equal(np.asarray(back), a), (mode, h, w, kind)
    # modes the fast path does not cover go through Pillow's encoder, still lossless
    p = Image.fromarray(rs.randint(0, 4, (5, 6)).astype(np.uint8), "L").convert("P")
    with Image.open(io.BytesIO(encode_png(p))) as back:
        assert back.mode == "P" and np.array_equal(np.asarray(back), np.asarray(p))


def test_fast_png_is_as_small_as_pillows_on_an_overlay_and_much_smaller_on_a_flat_plot() -> None:
    from onnx_gradcam.explain.png import encode_png

    rs = np.random.RandomState(0)
    photo = Image.fromarray(rs.randint(0, 256, (12, 16, 3), np.uint8)).resize((500, 375), Image.Resampling.BICUBIC)
    shown = overlay(photo, rs.rand(7, 7).astype(np.float32))
    pillow = io.BytesIO()
    shown.save(pillow, format="PNG", compress_level=1)
    assert len(encode_png(shown)) <= 1.1 * len(pillow.getvalue())
    plot = Image.new("RGB", (800, 300), "white")
    plot.paste((30, 30, 200), (100, 100, 700, 110))
    assert len(encode_png(plot)) < 0.01 * 800 * 300 * 3  # run lengths: a flat background costs little
