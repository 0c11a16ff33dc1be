"""Real third-party ONNX models that ship inside PyPI wheels, fetched once into .cache/."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "thirdparty"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"


def rapidocr_model(name: str) -> Path:
    """Path of `rapidocr_onnxruntime/models/<name>` from the rapidocr-onnxruntime 1.4.4 wheel."""
    target = CACHE / name
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), RAPIDOCR],
            check=True,
        )
        wheels = list(CACHE.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        data = wheel.read(f"rapidocr_onnxruntime/models/{name}")
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target
