"""Make docs/evaluate_report.png, the README's picture of a real report: `onnx-gradcam evaluate` on the
bundled samples (models/samples, models/demo_boxes.json) with two methods, shown in headless Chromium.

    python tools/evaluate_screenshot.py [--out docs/evaluate_report.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_gradcam.cli import main as cli  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluate_report.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(ROOT)  # the report names the model as the command line gave it
        argv = ["evaluate", "models/demo.onnx", "models/samples", "--boxes", "models/demo_boxes.json"]
        argv += ["--method", "gradcam", "--method", "gradcam++"]
        argv += ["-o", tmp, "--device", "cpu"]
        try:
            cli.main(argv, standalone_mode=False)
        except SystemExit as exc:  # pragma: no cover - a failed run is reported by the command itself
            if exc.code:
                raise
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 800}, device_scale_factor=1)
            page.goto((Path(tmp) / "report.html").as_uri())
            page.wait_for_load_state("load")
            box = page.locator("#plot-curves").bounding_box()  # the gallery and the deletion/insertion curves
            assert box is not None
            shot = page.screenshot(
                full_page=True, clip={"x": 0, "y": 0, "width": 1000, "height": box["y"] + box["height"] + 10}
            )
            browser.close()
    img = Image.open(io.BytesIO(shot)).convert("RGB")
    img = img.resize((800, round(img.height * 0.8)), Image.Resampling.LANCZOS)
    img = img.quantize(colors=128, dither=Image.Dither.NONE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
