"""`pip install cellserve` from a built wheel works in a fresh virtual environment."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(*cmd, cwd=None):
    """Run outside this test's environment, so nothing of the checkout leaks into the fresh venv."""
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600, env=CLEAN_ENV).stdout


def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT))
    (wheel,) = (tmp_path / "dist").glob("cellserve-*.whl")
    run(sys.executable, "-m", "venv", str(tmp_path / "venv"))
    bin_dir = tmp_path / "venv" / "bin"
    run(str(bin_dir / "pip"), "install", "-q", str(wheel))
    help_text = run(str(bin_dir / "cellserve"), "--help")
    for command in ("serve", "demo", "bench", "import-torch", "info"):
        assert command in help_text
    bench_help = run(str(bin_dir / "cellserve"), "bench", "--help")
    for command in ("cells", "serving", "multistep", "http", "ray"):
        assert command in bench_help
    # the embedded model ships inside the wheel and serves without torch installed
    out = run(str(bin_dir / "python"), "-c", "from cellserve.server.repository import Repository; "
              "r = Repository.defaults(); print(sorted(r.models))", cwd=tmp_path)
    assert "speller" in out and "sru-stream" in out
