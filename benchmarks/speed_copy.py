"""Alignment speed on a permuted copy: ``fuse([model, permuted copy], method="match")``, before and after, one run.

The selfcheck's case (:func:`fedfuse.align.selfcheck.selfcheck`: ``init=0, max_iter=1, bn_repair=None``) on
torchvision models (random init, ``num_classes=10``, :func:`break_symmetric_init`). "before" sets
``solvers._EXACT = False`` (every group's score built as the n × n product, as before the permuted-copy
shortcuts; the check_alignment reordering stays), or with ``--before-root DIR`` imports fedfuse from ``DIR``
(a checkout of the commit before, e.g. ``git archive 80b1242 | tar -x -C DIR``, run as it is); "after" is this
tree. Each (case, variant) runs in its own process, alternating, so peak RSS (``ru_maxrss`` of that process:
the model, its permuted copy, torch) is per variant and both see the same load. Times exclude building the
model, deriving the spec, permuting and the gate (``resolve_spec``: the spec proves itself once per model class
and shapes, cached; its time is the *gate s* column). ``max |Δ|``: fused vs the model (a permuted copy must come
back exactly), measured after the peak RSS is read.

    python benchmarks/speed_copy.py --cases resnet50 vgg11_bn --before-root /tmp/base --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ≥ 4.0: ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_gb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in GiB (``/proc/self/status``, kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _one(name: str, exact: bool | None) -> dict[str, Any]:
    """One (case, variant) in this process; ``exact`` sets ``solvers._EXACT`` (None: leave the imported tree's)."""
    import resource

    import torch
    import torchvision

    from fedfuse.align import derive_spec, fuse, solvers
    from fedfuse.align.selfcheck import break_symmetric_init
    from fedfuse.align.solvers import resolve_spec
    from fedfuse.align.transport import permute_model

    torch.set_num_threads(2)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        break_symmetric_init(model, x)
    spec = derive_spec(model, x[:1])
    permuted, _ = permute_model(model, spec, seed=0)
    if exact is not None:
        solvers._EXACT = exact
    t0 = time.perf_counter()
    resolve_spec(spec, model)  # the gate: a given spec proves itself once per model class and shapes (cached)
    gate = time.perf_counter() - t0
    gate_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gc.collect()
    reset = _reset_peak()  # the gate's own peak (its float64 copies) is not the call's
    rss0 = _status_gb("VmRSS")
    t0 = time.perf_counter()
    fused = fuse([model, permuted], method="match", spec=spec, init=0, max_iter=1, bn_repair=None)
    seconds = time.perf_counter() - t0
    peak = _status_gb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ref = model.state_dict()
    diff = max(float((fused[k] - ref[k]).abs().max()) for k in fused if fused[k].is_floating_point())
    params = sum(p.numel() for p in model.parameters())
    variant = "after" if exact else "before"
    return {"case": name, "variant": variant, "seconds": seconds, "gate_seconds": gate, "peak_rss_gb": peak} | {
        "rss_before_call_gb": rss0,
        "peak_rss_with_gate_gb": gate_peak,
        "peak_is_the_calls": reset,
        "max_abs_diff": diff,
        "params": params,
        "groups": len(spec.groups),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["resnet50", "vgg11_bn"])
    p.add_argument("--no-before", action="store_true")
    p.add_argument("--before-root", type=Path, help="import fedfuse from this checkout for 'before'")
    p.add_argument("--one", nargs=2, metavar=("CASE", "EXACT"), help=argparse.SUPPRESS)
    sys.path.insert(0, str(ROOT))  # benchmarks.common from this checkout (a --before-root tree may lack it) ...
    from benchmarks.common import add_out, load_header, load_line

    sys.path.remove(str(ROOT))  # ... while fedfuse still comes from PYTHONPATH (the --before-root tree for 'before')

    add_out(p)
    a = p.parse_args()
    if a.one:
        print(json.dumps(_one(a.one[0], {"0": False, "1": True}.get(a.one[1]))))
        return
    start = load_line()
    print(start, flush=True)
    rows = []
    for case in a.cases:
        for exact in ([0] if not a.no_before else []) + [1]:
            root = a.before_root if (not exact and a.before_root) else ROOT
            flag = "root" if root != ROOT else str(exact)  # a before tree runs as it is (its own _EXACT)
            env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            load = os.getloadavg()[0]
            out = subprocess.run(
                [sys.executable, __file__, "--one", case, flag], env=env, capture_output=True, text=True
            )
            row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"case": case}
            row |= {"load": load, "root": str(root)} | (
                {} if out.returncode == 0 else {"error": out.stderr.strip()[-300:]}
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    end = load_line()
    print(end, flush=True)
    lines = [
        "# Alignment speed: a permuted copy recovered by `fuse(method='match')` (selfcheck's case), before/after",
        "",
        f"`python benchmarks/speed_copy.py {' '.join(sys.argv[1:])}`; {platform.machine()}, {os.cpu_count()} cores, "
        "2 torch threads; each row its own process; *peak RSS*: that process's during the call (model + permuted "
        "copy + torch + the call; the peak is reset after the gate), *with gate*: its peak since it started; "
        f"before = {'fedfuse from ' + str(a.before_root) if a.before_root else 'solvers._EXACT = False'}. "
        f"`uptime` at the end: {up}. *load*: 1-minute load average as each row started.",
        "",
        load_header(start, end),
        "",
        "| case | params | variant | s | gate s (once) | RSS before call GB | peak RSS GB | with gate GB | max abs diff "
        "| load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | error: {r['error'][-120:]} | | | | | | | {r['load']:.1f} |")
            continue
        lines.append(
            f"| {r['case']} | {r['params']:,} | {r['variant']} | {r['seconds']:.2f} | {r.get('gate_seconds', 0):.2f} | "
            f"{r['rss_before_call_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r.get('peak_rss_with_gate_gb', 0):.2f} | "
            f"{r['max_abs_diff']:.1e} | {r['load']:.1f} |"
        )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "speed-copy.md").write_text("\n".join(lines) + "\n")
    (a.out / "speed-copy.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
