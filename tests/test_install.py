"""A non-editable install works away from the checkout.

The wheel is built from a copy of the sources and installed into a fresh virtual environment
(no system site-packages). Its dependencies are this environment's, made visible through a
`.pth` line rather than downloaded again (a second torch/DeepSpeed/MLflow install costs minutes
and gigabytes); pip still checks them, since the install runs with `--no-index` and fails if
any requirement of the wheel's metadata is missing. Everything then runs from a folder outside
the checkout, so the package can only find what the wheel itself ships (the ZeRO recipes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import ROOT, SHAKESPEARE, subprocess_env

pytestmark = pytest.mark.slow


def run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the letngpt wheel; returns its python."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "letngpt", src / "letngpt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", base / "dist", src],
        cwd=base)
    wheel = next((base / "dist").glob("letngpt-*.whl"))

    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base)
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout.strip()
    (Path(purelib) / "outer_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", wheel], cwd=base)
    return python


def clean_env(**extra: str) -> dict:
    env = subprocess_env(**extra)
    env.pop("PYTHONPATH", None)  # nothing of the checkout may leak in
    return env


def test_package_comes_from_the_venv_not_the_checkout(installed, tmp_path):
    code = "import letngpt, letngpt.train.engine as e; print(letngpt.__file__); print(e.DS_CONFIG_DIR)"
    out = run([installed, "-c", code],
              cwd=tmp_path, env=clean_env()).stdout.split()
    venv = installed.parent.parent
    assert Path(out[0]).is_relative_to(venv) and not Path(out[0]).is_relative_to(ROOT)
    assert sorted(p.name for p in Path(out[1]).glob("*.json")) == [f"zero{s}.json" for s in range(4)]


def test_help_and_console_script(installed, tmp_path):
    help_text = run([installed, "-m", "letngpt", "--help"], cwd=tmp_path, env=clean_env()).stdout
    assert "--config" in help_text
    script = installed.parent / "letngpt-train"
    assert "tiny_LETNGPT" in run([script, "--list-configs"], cwd=tmp_path, env=clean_env()).stdout


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"needs {SHAKESPEARE}")
def test_three_step_run_from_another_folder(installed, tmp_path):
    """The default tiny run, shortened: data prepared into ./data, checkpoints into ./out."""
    args = ["-m", "letngpt", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--log_interval=1",
            "--checkpoint_interval=3", "--zero_stage=1"]
    run([installed, *args], cwd=tmp_path, env=clean_env(LETNGPT_SHAKESPEARE=str(SHAKESPEARE)))
    summary = json.loads((tmp_path / "out" / "tiny_LETNGPT" / "summary.json").read_text())
    assert summary["final_step"] == 3
    assert (tmp_path / "data" / "tinyshakespeare" / "meta.json").is_file()
    assert os.path.isfile(tmp_path / "out" / "tiny_LETNGPT" / "checkpoints" / "latest_complete")


def test_make_setup_is_idempotent_and_isolates_only_deepspeed(tmp_path):
    """`make setup` is a no-op while the stamp is newer than its inputs, reruns when they change,
    and only the DeepSpeed line skips build isolation."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "constraints", tmp_path / "constraints")
    stamp = tmp_path / ".venv" / ".letngpt-installed"
    stamp.parent.mkdir()
    stamp.touch()
    older = stamp.stat().st_mtime - 60
    for name in ("pyproject.toml", "constraints/cpu.txt"):
        os.utime(tmp_path / name, (older, older))
    assert subprocess.run(["make", "-q", "setup"], cwd=tmp_path).returncode == 0  # up to date: nothing to do
    os.utime(tmp_path / "pyproject.toml")  # now newer than the stamp
    assert subprocess.run(["make", "-q", "setup"], cwd=tmp_path).returncode == 1
    lines = run(["make", "-n", "setup"], cwd=tmp_path).stdout.splitlines()
    installs = [line for line in lines if "pip install" in line]
    assert len(installs) == 4 and all("-c constraints/cpu.txt" in line for line in installs)
    no_isolation = [line for line in installs if "--no-build-isolation" in line]
    assert len(no_isolation) == 1 and no_isolation[0].rstrip().endswith("deepspeed")


def test_ci_runs_the_readme_test_command_without_pip_cache():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].split()
    assert quick == ["make", "train", "make", "test"]
    commands = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "export PIP_NO_CACHE_DIR=1" in commands and commands[-1] == "make test"
