"""The Ray Data adapter (onnx_gradcam/ray.py) on a local Ray cluster started here, against the
single-machine CLI and Explainer on the same files; a worker killed mid-run loses and doubles nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from onnx_gradcam import Explainer  # noqa: E402
from onnx_gradcam.cli import main  # noqa: E402
from onnx_gradcam.explain.images import load_image  # noqa: E402
from onnx_gradcam.explain.pipeline import Job, RenderOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"
SAMPLES = sorted((ROOT / "models" / "samples").glob("*.png"))


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    """One local cluster for the module (start-up takes seconds on 2 cores); the workers import
    this checkout's package and this test module (for the actor that dies once)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _images(folder: Path) -> None:
    """The three samples, copies of them under another name and in a subfolder (stems that the CLI
    names star, star-2), turned and in another format, and one unreadable file."""
    (folder / "sub").mkdir(parents=True)
    for p in SAMPLES:
        shutil.copy(p, folder / p.name)
    shutil.copy(SAMPLES[1], folder / "sub" / "star.png")
    load_image(SAMPLES[0]).rotate(90, expand=True).save(folder / "turned.jpg", quality=90)
    load_image(SAMPLES[2]).convert("L").save(folder / "grey.png")
    (folder / "broken.png").write_bytes(b"not an image")


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_import_onnx_gradcam_does_not_import_ray() -> None:
    code = "import sys, onnx_gradcam; sys.exit(1 if 'ray' in sys.modules or 'onnx_gradcam.ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0


def test_cli_on_ray_writes_what_the_cli_writes(cluster, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every file byte for byte (overlays, raw maps, predictions.json), the same skipped file and exit code."""
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs")
    code, plain_out = _cli("explain", str(DEMO), "imgs", "-o", "plain", "--top-k", "2")
    assert code == 1 and "broken.png" in plain_out  # the unreadable file is reported and skipped
    code, ray_out = _cli("explain", str(DEMO), "imgs", "-o", "onray", "--top-k", "2", "--ray", "--workers", "1")
    assert code == 1, ray_out
    assert "skipped:" in ray_out and "broken.png" in ray_out and "explained 6 of 7 images" in ray_out
    plain, on_ray = _files(tmp_path / "plain"), _files(tmp_path / "onray")
    assert sorted(on_ray) == sorted(plain)
    assert len(plain) == 6 * 2 * 2 + 2 and "star-2.gradcam.top1.c3.png" in plain
    for name in plain:
        if name == "predictions.jsonl":  # the journal is in the order inputs finish
            assert sorted(on_ray[name].splitlines()) == sorted(plain[name].splitlines())
        else:
            assert on_ray[name] == plain[name], name
    entries = json.loads(plain["predictions.json"])
    assert [(e["file"], e["rank"]) for e in entries][:2] == [("imgs/circle.png", 1), ("imgs/circle.png", 2)]
    # --resume through Ray: the journal's finished inputs are not sent again, predictions.json is the same
    (tmp_path / "onray" / "predictions.json").unlink()
    code, again = _cli("explain", str(DEMO), "imgs", "-o", "onray", "--top-k", "2", "--ray", "--resume")
    assert code == 1 and "explained 6 of 7 images (6 from an earlier run)" in again, again
    assert _files(tmp_path / "onray")["predictions.json"] == plain["predictions.json"]


def test_explain_dataset_maps_equal_the_explainer_and_round_trip_parquet(cluster, tmp_path: Path) -> None:
    """read_images (decoded pixels) through two actors, written with write_parquet and read back:
    maps, raw maps, classes, scores and probabilities equal Explainer.explain bit for bit."""
    import pyarrow.parquet as pq

    from onnx_gradcam.ray import explain_dataset

    ds = ray.data.read_images([str(p) for p in SAMPLES], include_paths=True, mode="RGB")
    out = explain_dataset(ds, DEMO, concurrency=2, num_cpus=0.5, batch_size=2, labels=None)
    out.drop_columns(["map"]).write_parquet(str(tmp_path / "maps"))  # raw keeps it small; map checked below
    rows = {Path(r["path"]).name: r for r in out.take_all()}
    table = pq.read_table(tmp_path / "maps").to_pylist()
    ref = Explainer(DEMO).explain([load_image(p) for p in SAMPLES])
    assert sorted(rows) == [p.name for p in SAMPLES]
    for i, p in enumerate(SAMPLES):
        row = rows[p.name]
        assert row["map"].dtype == np.float32 and np.array_equal(row["map"], ref.maps[i])
        assert np.array_equal(row["raw"], ref.raw[i])
        assert row["class"] == int(ref.targets[i]) and row["score"] == float(ref.scores[i])
        assert row["probability"] == float(ref.probabilities[i, int(ref.targets[i])])
        back = next(t for t in table if Path(t["path"]).name == p.name)
        assert np.array_equal(np.asarray(back["raw"], np.float32), ref.raw[i]) and back["class"] == row["class"]


class DiesOnce:
    """Mixed into the files actor: the worker process exits (os._exit) in the middle of a batch,
    after writing that batch's earlier images, the first time it reaches the chosen image."""

    marker: Path
    victim = "victim"

    def write(self, rendered, name):  # type: ignore[no-untyped-def]
        if name == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().write(rendered, name)  # type: ignore[misc]


def test_a_worker_killed_mid_run_is_retried_and_nothing_is_lost_or_doubled(cluster, tmp_path: Path) -> None:
    from onnx_gradcam import ray as on_ray

    class Killed(DiesOnce, on_ray.ExplainToFiles):
        marker = tmp_path / "died"

    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [f"img{k}" for k in range(7)] + ["victim"]
    for k, name in enumerate(names):
        shutil.copy(SAMPLES[k % 3], folder / f"{name}.png")
    out = tmp_path / "out"
    out.mkdir()
    exp = Explainer(DEMO)
    listed = on_ray.list_inputs([folder.as_uri()], exclude=out)  # a URI: read through pyarrow's filesystem
    done = on_ray.explain_files(
        exp, listed, out, Job(), RenderOptions(), batch_size=3, workers=2, num_cpus=0.5, actor_class=Killed
    )
    assert (tmp_path / "died").exists()  # a worker did die
    assert done.explained == len(names) and not done.failed
    entries = json.loads((out / "predictions.json").read_text())
    assert [e["file"] for e in entries] == [(folder / f"{n}.png").as_uri() for n in sorted(names)]
    settings, *lines = (out / "predictions.jsonl").read_text().splitlines()
    assert json.loads(settings)["run"]["render"]["format"] == "png"
    journal = [json.loads(line)["file"] for line in lines]
    assert sorted(journal) == sorted(e["file"] for e in entries)  # each input once
    ref = exp.explain([load_image(folder / f"{n}.png") for n in sorted(names)])
    expected = {f"{n}.gradcam.c{int(c)}.{ext}" for n, c in zip(sorted(names), ref.targets) for ext in ("png", "npy")}
    expected |= {"predictions.json", "predictions.jsonl"}
    assert {p.name for p in out.iterdir()} == expected  # no temporary leftovers either
    for n, raw in zip(sorted(names), ref.raw):
        cls = int(ref.targets[sorted(names).index(n)])
        assert np.array_equal(np.load(out / f"{n}.gradcam.c{cls}.npy"), raw)


def test_ray_refuses_what_it_cannot_run(cluster, tmp_path: Path) -> None:
    code, output = _cli("explain", str(DEMO), str(tmp_path / "nothing"), "-o", str(tmp_path / "o"), "--ray")
    assert code == 1 and "no inputs to explain" in output and len(output.strip().splitlines()) <= 4
    assert not (tmp_path / "o").exists()
