"""Time the demo end to end, cold and cached.

    python bench/bench_demo.py [--out bench/demo_timing.json]

1. cold: ``compress demo`` with an empty artifacts folder and a fresh PREFECT_HOME (so the time
   includes Prefect's first database migration, as on a new machine);
2. cached: the same command again; every stage should be reused (``cached`` in the report, ``Reused`` in Prefect);
3. resumed: a third run under a new run name with one downstream change (``--set
   quantize.scheme.group_size=32``): only quantize, kv, evaluate and export run.
Prints a table and writes the figures as JSON. Wall-clock seconds of the whole CLI process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "llm_compress.flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"command failed: {args}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return dt, p.stdout + p.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "demo_timing.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    art = str(work / "artifacts")
    rows = []
    runs = (("cold", []), ("cached", []), ("downstream change", ["--set", "quantize.scheme.group_size=32"]))
    for label, extra in runs:
        dt, _ = timed(["demo", "--artifacts", art, *extra], env)
        reports = sorted(Path(art).glob("*/report.json"), key=lambda p: p.stat().st_mtime)
        rep = json.loads(reports[-1].read_text())
        states = {s["stage"]: s["state"] for s in rep["stages"]}
        stage_s = {s["stage"]: s["duration_s"] for s in rep["stages"]}
        rows.append({"run": label, "wall_s": round(dt, 1), "states": states, "stage_seconds": stage_s,
                     "published": rep["published"]})
        print(f"{label:18} {dt:7.1f} s  {states}")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "runs": rows, "cached_over_cold": round(rows[1]["wall_s"] / rows[0]["wall_s"], 3)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"cached / cold = {result['cached_over_cold']}")


if __name__ == "__main__":
    main()
