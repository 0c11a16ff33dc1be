"""README.md stays true: two set-up commands, the second is what CI runs, the first works."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(("pytest_rc", "ci_rc"), [(0, 0), (1, 1), (5, 1)])
def test_ci_script_fails_on_failures_and_on_no_tests(tmp_path: Path, pytest_rc: int, ci_rc: int) -> None:
    # .ci/run with stand-ins for python3, python and pip: exit code 5 ("no tests") must be red
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.log"
    venv = '[ "$1 $2" = "-m venv" ] && mkdir -p "$3/bin" && : > "$3/bin/activate" && exit 0'
    tool = f'echo "$(basename "$0") $*" >> {log}; case "$*" in *pytest*) exit {pytest_rc};; esac; exit 0'
    for name, body in (("python3", venv + "\n" + tool), ("python", tool), ("pip", tool)):
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    _stand_ins(fake, log, {"chromium": 0, "apt-get": 0})  # so this test never installs chromium for real
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "CI": "true"}
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert proc.returncode == ci_rc, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[-2:] == ["pip install -e .[test]", "python -m pytest -q"]


# -- .ci/run installs chromium for tests/test_webpage.py (webpage's block) ----------------------------


def _stand_ins(folder: Path, log: Path, tools: dict[str, int]) -> None:
    """Scripts in `folder` that log their call and exit with the given code."""
    for name, rc in tools.items():
        (folder / name).write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> {log}\nexit {rc}\n')
        (folder / name).chmod(0o755)


@pytest.mark.parametrize(
    ("uid", "present", "want"),
    [
        ("0", ["apt-get"], ["apt-get update", "apt-get install -y chromium"]),
        ("1000", ["apt-get", "sudo"], ["sudo apt-get update", "sudo apt-get install -y chromium"]),
        ("1000", ["apt-get"], []),  # neither root nor sudo: a warning, and the test fails later with its message
        ("0", ["apt-get", "chromium"], []),  # already installed
        ("0", [], []),  # no apt-get: not a Debian-like system
    ],
)
def test_ci_script_installs_chromium_where_absent(
    tmp_path: Path, uid: str, present: list[str], want: list[str]
) -> None:
    # .ci/run on a PATH holding only stand-ins and the few tools it needs, none of them chromium
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.log"
    log.write_text("")
    for tool in ("dirname", "rm", "mkdir", "basename"):
        (fake / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    venv = f'echo "python3 $*" >> {log}; mkdir -p "$3/bin" && : > "$3/bin/activate"'
    (fake / "python3").write_text(f"#!/bin/sh\n{venv}\n")
    (fake / "python3").chmod(0o755)
    _stand_ins(fake, log, {"python": 0, "pip": 0, "apt-get": 0, "chromium": 0})
    (fake / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (fake / "sudo").write_text(f'#!/bin/sh\necho "sudo $*" >> {log}\nexit 0\n')
    for tool in ("id", "sudo"):
        (fake / tool).chmod(0o755)
    for absent in {"apt-get", "chromium", "sudo"} - set(present):
        (fake / absent).unlink()
    bash = shutil.which("bash") or "/bin/bash"
    proc = subprocess.run([bash, str(repo / ".ci" / "run")], env={"PATH": str(fake)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert [c for c in calls if "apt-get" in c] == want
    assert calls[-2:] == ["pip install -e .[test]", "python -m pytest -q"]  # and the tests still run after it
    if "apt-get" in present and "chromium" not in present and not want:
        assert "cannot install it" in proc.stderr


def test_the_cli_reference_lists_exactly_the_options() -> None:
    from onnx_gradcam.cli import main

    reference = README.split("## Command line", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    for line in reference.split("onnx-gradcam ")[1:]:
        name = line.split()[0]
        command = main.commands[name]
        known = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
        used = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", line))
        assert used <= known, f"{name}: {sorted(used - known)} are not options of `onnx-gradcam {name}`"
        options = [param for param in command.params if param.opts[0].startswith("-")]
        missing = [param.opts[0] for param in options if not used & set(param.opts)]
        assert not missing, f"the README's reference of `onnx-gradcam {name}` lacks {missing}"
