"""Screenshots of the Prefect UI for the README: a finished pipeline run and the deployment's parameter form.

    apt-get install chromium            # Debian's package (a browser a pip package downloads cannot be fetched here)
    python docs/screenshots.py          # writes docs/prefect-run.png, prefect-form.png, prefect-deployment.png

It starts `prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME (SQLite), runs configs/tiny.yaml through
the flow against it, registers a deployment of configs/demo.yaml (the form a user fills in from the UI's "Run" ->
"Custom run"), and shoots both pages with headless Chromium. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_for(url: str, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def shoot(url: str, out: Path, size: str = "1600,1000", wait_ms: int = 40000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=4321)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    a = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="prefect-shots-"))
    api = f"http://127.0.0.1:{a.port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(a.port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"{api}/health")
        code = f"""
import json
from llm_compress.flows.pipeline import compress
from llm_compress.config import load_recipe
from prefect.client.orchestration import get_client
rep = compress(recipe=load_recipe('configs/tiny.yaml'), run_name='tiny-ui', artifacts_dir={str(home / 'artifacts')!r})
dep = compress.to_deployment(name='demo', cron='0 2 * * *',
                             parameters={{'recipe': load_recipe('configs/demo.yaml').model_dump(mode='json')}})
dep_id = dep.apply()
with get_client(sync_client=True) as c:
    run = c.read_flow_runs()[0]
print(json.dumps({{'run': str(run.id), 'deployment': str(dep_id)}}))
"""
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=900, check=True)
        import json

        ids = json.loads(out.stdout.strip().splitlines()[-1])
        ui = f"http://127.0.0.1:{a.port}"
        shoot(f"{ui}/runs/flow-run/{ids['run']}", Path(a.out) / "prefect-run.png")
        # the form greys out as the page keeps polling; 3 s of virtual time shows it rendered
        shoot(f"{ui}/deployments/deployment/{ids['deployment']}/run", Path(a.out) / "prefect-form.png", wait_ms=3000)
        shoot(f"{ui}/deployments/deployment/{ids['deployment']}", Path(a.out) / "prefect-deployment.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
