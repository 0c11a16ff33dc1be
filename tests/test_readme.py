"""README.md stays true: two set-up commands, the second is what CI runs, the first works."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_exactly_two_setup_commands_and_ci_runs_the_second() -> None:
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].startswith("pip install -e . && onnx-gradcam explain models/demo.onnx")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_first_setup_command_explains_the_demo(tmp_path: Path) -> None:
    # the install half is what CI itself just did; run the explain half as a user would
    explain = commands_after_install(setup_commands()[0])
    argv = shlex.split(explain)
    assert argv[0] == "onnx-gradcam"
    argv = [sys.executable, "-m", "onnx_gradcam.cli", *argv[1:]]
    argv = [str(ROOT / a) if a.startswith("models/") else a for a in argv]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / argv[argv.index("-o") + 1]
    (entry,) = json.loads((out / "predictions.json").read_text())
    assert (out / entry["overlay"]).is_file() and (out / entry["raw_map"]).is_file()
    labels = (ROOT / "models" / "labels.txt").read_text().split()
    assert labels[entry["class"]] == "star"


def commands_after_install(command: str) -> str:
    return command.split("&&", 1)[1].strip()


def test_supported_ops_list_is_generated_from_the_registry() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_ops_table.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
