"""Every fenced ``python`` and ``bash`` snippet of README.md runs, in order, in a fresh copy of the repository
(as after a clone and the README's first command), so the README cannot drift from the code.

Small settings, and nothing else changed (each override is listed here):
- ``.venv`` is this test's environment (a link); ``make`` gets ``VENV=<it>`` and ``-o <stamp>`` so it never
  reinstalls into it;
- ``make demo`` gets ``DEMO_ARGS="--rounds 1 --num-clients 2 --backend inline"`` (the Makefile appends them;
  later flags win); ``make test`` gets ``PYTEST_ARGS=tests/test_layering.py`` (the whole suite would run this
  test again);
- every ``fedfuse simulate`` line gets ``--rounds 1 --num-clients 2 --local-epochs 1 --backend inline``
  appended (``--compare`` passes them on to each strategy);
- ``flwr run`` lines get ``--run-config "num-rounds=1"`` appended, with a private ``FLWR_HOME`` and free
  ports for the local SuperLink Flower starts (stopped afterwards: it is found by its port), and
  ``FEDFUSE_HOME`` = the copy (a relative ``out`` lands in it, not in ``~/.fedfuse``);
- a python snippet whose first line is ``# some/path.py`` is also written to that path (the module a later
  snippet imports);
- shell snippets run as one reader's session would: once a snippet has run ``source .venv/bin/activate``
  (or ``export``ed a variable), later ones start with the same lines.
The number of snippets executed must equal the number found: nothing is skipped silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedfuse.runners.ray import _free_port, wait_finished

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL = ("bash", "sh", "shell")
SMALL_SIM = " --rounds 1 --num-clients 2 --local-epochs 1 --backend inline"


def snippets(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced python/shell block, in order."""
    return [(lang, code) for lang, code in FENCE.findall(text) if lang == "python" or lang in SHELL]


def small(line: str, venv: str) -> str:
    """One README shell line with the small settings above."""
    stamp = f"{venv}/.fedfuse-installed"
    if re.match(r"\s*make demo\b", line):
        return f'make -o {stamp} VENV={venv} DEMO_ARGS="--rounds 1 --num-clients 2 --backend inline" demo'
    if re.match(r"\s*make test\b", line):
        return f"make -o {stamp} VENV={venv} PYTEST_ARGS=tests/test_layering.py test"
    code = line.split("#", 1)[0].rstrip() if not line.rstrip().endswith("\\") else line
    if "fedfuse simulate" in line and not line.rstrip().endswith("\\"):
        return code + SMALL_SIM + (" --client-pool 2" if "--client-pool" in code else "")  # a pool fits 2 clients
    if re.search(r"\bflwr run\b", line):
        return code + ' --run-config "num-rounds=1"'
    return line


def join_continuations(code: str) -> list[str]:
    lines, buf = [], ""
    for raw in code.splitlines():
        buf += raw[:-1] + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(buf)
            buf = ""
    return lines


def stop_local_superlink(port: int) -> None:
    """Stop the SuperLink `flwr run` started for this test (its own process group), found by its port."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in c for c in cmd) and str(port).encode() in cmd:
            pid = int(proc.name)
            try:
                os.killpg(os.getpgid(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.mark.ray  # the flwr run snippet starts Flower's simulation engine
def test_every_readme_snippet_runs(tmp_path: Path) -> None:
    found = snippets((ROOT / "README.md").read_text())
    assert len(found) >= 8, [lang for lang, _ in found]
    repo = tmp_path / "clone"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"))  # fmt: skip
    venv = sys.prefix
    (repo / ".venv").symlink_to(venv)
    port, control = _free_port(), _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FEDFUSE_HOME": str(repo),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "PYTHONPATH": str(repo),  # the copy's code (an editable install points at the original)
        "NO_COLOR": "1",
    }
    executed = []
    session: list[str] = []  # activation and exports so far, as in one reader's shell
    try:
        for i, (lang, code) in enumerate(found):
            if lang == "python":
                first = code.splitlines()[0]
                if m := re.match(r"#\s*([\w/]+\.py)\s*$", first):
                    (repo / m.group(1)).parent.mkdir(parents=True, exist_ok=True)
                    (repo / m.group(1)).write_text(code)
                cmd = [sys.executable, "-c", code]
            else:
                lines = [small(ln, venv) for ln in join_continuations(code)]
                script = "\n".join(["set -euo pipefail", *session, *lines])
                session += [ln for ln in lines if re.match(r"\s*(source|\.|export)\s", ln)]
                cmd = ["bash", "-c", script]
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
            log = proc.stdout + proc.stderr
            where = f"snippet {i} ({lang}):\n{code}\n---\n{log[-4000:]}"
            assert proc.returncode == 0, where
            assert "Traceback" not in log and "fedfuse: error" not in log, where
            executed.append(i)
        # `flwr run --stream` can return before its run ends (seen under load): wait for every run it started
        runs = subprocess.run([str(Path(venv) / "bin" / "flwr"), "list", "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=120).stdout  # fmt: skip
        for run_id in re.findall(r'"run-id": "(\d+)"', runs):
            status, details = wait_finished(env, run_id, timeout=600)
            assert status == "finished:completed", (run_id, status, details)
    finally:
        stop_local_superlink(port)
    assert len(executed) == len(found)
    print(f"README: {len(executed)} of {len(found)} snippets executed")
    # what the README promises they write
    assert (repo / "runs/demo/compare.png").is_file() and (repo / "runs/first/model.pt").is_file()
    for run in ("fedavg", "wb", "fedavg@client-init=shared"):  # the demo: apart (own inits) and a shared init
        assert (repo / "runs/demo" / run / "metrics.json").is_file()
    assert (repo / "runs/cmp/compare.png").is_file() and (repo / "runs/apart/compare.png").is_file()
    assert (repo / "runs/sites/model.pt").is_file()  # started from runs/pre's saved client models
    assert (repo / "runs/mine/my_pkg.my_mod.MyStrategy/metrics.json").is_file()
    assert (repo / "runs/flwr-run/metrics.json").is_file()
    merged = json.loads((repo / "runs/merge/merge.json").read_text())
    assert {"parents", "average", "ensemble", "methods"} <= set(merged) and len(merged["parents"]) == 2
    assert (repo / "runs/merge-recipe/model.pt").is_file()


CLI_CLAIM = re.compile(r"`fedfuse (simulate [^`]*)`[^`]*?`(fedfuse: error: [^`]*)`", re.S)


def test_every_cli_error_the_readme_quotes_is_what_the_cli_prints(capsys) -> None:
    """Each "`fedfuse simulate ARGS` ... `fedfuse: error: LINE`" of the README: that line, alone, exit code 2."""
    from fedfuse.cli import main

    claims = CLI_CLAIM.findall((ROOT / "README.md").read_text())
    assert len(claims) >= 2, claims  # --num-round (nearest flag) and --strateg (no abbreviations)
    for args, line in claims:
        try:
            code = main(args.split())
        except SystemExit as exc:
            code = int(exc.code)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == " ".join(line.split()), (args, err)


def test_the_readme_strategy_table_lists_every_registered_strategy() -> None:
    """The table under "### Strategies": one row per name of strategies.registry.STRATEGIES, with its class."""
    import strategies
    from strategies.registry import STRATEGIES, resolve_strategy

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Strategies") :].split("\n\n")[1]
    rows = dict(re.findall(r"^\| `([\w-]+)` \| `strategies\.(\w+)` \|", section, re.M))
    assert list(rows) == list(dict.fromkeys(rows)) and set(rows) == set(STRATEGIES), (sorted(rows), sorted(STRATEGIES))
    for name, cls in rows.items():
        assert getattr(strategies, cls) is resolve_strategy(name), (name, cls)
