"""Benchmarks take ``--out DIR`` (a read-only checkout can run them) and record the machine and load: every file
goes under DIR, nothing new under benchmarks/results, and the report carries the load lines (kept on --report)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import common, regimes, torchvision_coverage

RESULTS = Path(common.__file__).resolve().parent / "results"


def _snapshot() -> dict[str, float]:
    """Names and modification times of everything under benchmarks/results."""
    return {str(p): p.stat().st_mtime for p in RESULTS.rglob("*")} if RESULTS.exists() else {}


def test_add_out_defaults_to_results_and_load_header_has_both_lines(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    common.add_out(p)
    assert p.parse_args([]).out == common.RESULTS == RESULTS
    assert p.parse_args(["--out", str(tmp_path)]).out == tmp_path
    start, end = common.load_line(), common.load_line()
    assert "load " in start and " cores at " in start
    header = common.load_header(start, end)
    assert header.startswith("Machine and load at start: ") and f"Load at end: {end}" in header
    data: dict = {}
    common.note_load(data, start, end)
    assert data["loads"] == [header] and common.recorded_loads(data)[-1] == f"- {header}"
    assert "not recorded" in common.recorded_loads({})[0]


def test_regimes_writes_only_under_out_and_report_keeps_the_load(tmp_path: Path, monkeypatch) -> None:
    def fake(args, model, alpha, epochs, method, seed):
        rounds = 1 if method in regimes.ONE_SHOT else regimes.rounds_for(args.budget, epochs)
        return {"accuracy": 0.5, "seconds": 0.0, "rounds": rounds, "local_epochs": epochs}

    monkeypatch.setattr(regimes, "one_run", fake)
    before = _snapshot()
    out = tmp_path / "new" / "dir"  # created if missing
    regimes.main(["--quick", "--tag", "t", "--out", str(out)])
    assert {p.name for p in out.iterdir()} >= {"regimes-t.json", "regimes-t.md", "regimes-t.png"}
    loads = json.loads((out / "regimes-t.json").read_text())["loads"]
    assert len(loads) == 1 and "load at start" in loads[0] and "Load at end" in loads[0]
    md = (out / "regimes-t.md").read_text()
    assert f"- {loads[0]}" in md
    regimes.main(["--quick", "--tag", "t", "--out", str(out), "--report"])  # a rewrite keeps the recorded lines
    assert f"- {loads[0]}" in (out / "regimes-t.md").read_text()
    assert _snapshot() == before


@pytest.mark.filterwarnings("ignore")
def test_coverage_report_only_writes_under_out(tmp_path: Path) -> None:
    before = _snapshot()
    record = {"model": "x", "derived": False, "ok": False, "reason": "r", "groups": 0, "permuted_err": None}
    record |= {"errors": {}, "failures": {}, "seconds": {}, "total_s": 1.0, "params_m": 0.1, "input": 8}
    record["load"] = common.load_line()
    (tmp_path / "tv.json").write_text(json.dumps([record]))
    torchvision_coverage.main(["--report-only", "--tag", "tv", "--out", str(tmp_path)])
    md = (tmp_path / "tv.md").read_text()
    assert common.load_header(record["load"], record["load"]) in md
    assert _snapshot() == before


def test_attack_tables_of_every_suite_name_their_command_columns_and_what_holds(tmp_path: Path) -> None:
    """benchmarks/attacks.py's plumbing without running a cell: every job key of a suite lands in its table, each
    suite names its own command, strategies, settings and defences, and `holds` counts the cells below `absent`."""
    from benchmarks.attacks import SUITES, jobs, write_table

    for key, suite in SUITES.items():
        results = {}
        for k, _ in jobs(suite):
            attack = k.split("|")[4] if k.startswith("attack|") else "clean"
            acc = {"none": 0.7, "absent": 0.65, "evade:0.4": 0.1}.get(attack, 0.64)
            results[k] = {"accuracy": acc, "clipped": 1}
        path = tmp_path / f"{suite.name}.md"
        write_table(results, path, {}, suite)
        text = path.read_text()
        command = "python benchmarks/attacks.py" + ("" if key == "mlp" else f" --suite {key}")
        assert f"Command: `{command}`" in text
        n = len(suite.settings) * (len(suite.attacks) - 2)  # every attack but the two references
        for s in suite.strategies:
            for d in suite.defences:
                assert f"- **{d}** ({s}): {n - len(suite.settings)} of {n} attack cells within 3 points of `absent`; " \
                       f"below it: " in text  # fmt: skip
            assert "| " + " | ".join(f"{s} {d}" for d in suite.defences) + " |" in text
        rows = [line for line in text.splitlines() if line.startswith("| evade:0.4 | ")]
        cell = "0.100 ±0.000 (-60.0 / -55.0) 3c"  # every strategy × defence column of each setting's row
        assert len(rows) == len(suite.settings)
        assert all(r.count(cell) == len(suite.defences) * len(suite.strategies) for r in rows)
        assert ("## Clean runs" in text) == suite.clean
