"""Screenshots of the Prefect UI for the README: a finished pipeline run and the deployment's parameter form.

    apt-get install chromium            # Debian's package (a browser a pip package downloads cannot be fetched here)
    python docs/screenshots.py          # writes docs/prefect-run.png, prefect-form.png, prefect-deployment.png

It starts `prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME (SQLite), runs configs/tiny.yaml through
the flow against it twice, under two run names, registers a deployment of configs/demo.yaml (the form a user fills in
from the UI's "Run" -> "Custom run"), and shoots the pages with headless Chromium. The run screenshot is the second
run's "Task Runs" tab: the runner's cache reused every stage of the first run, so each task run is listed by its stage
name in the Completed state named `Reused`, which is what a rerun looks like (the run page's graph, its default view,
colours the bars by state type and shows no state names). Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
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


def shoot(url: str, out: Path, shows: str, tab: str | None = None, size: str = "1600,1000",
          seconds: float = 60) -> None:
    """Open ``url`` in headless Chromium, click the tab labelled ``tab`` if given, wait until the page's text holds
    ``shows``, and write a PNG of the viewport (``size``: width,height) to ``out``.

    Chromium is driven over its DevTools protocol (with the websocket client Prefect depends on) rather than shot
    with ``--screenshot``: that flag cannot click a tab, the run page's ``?tab=`` query does not survive loading
    (the page falls back to its first tab while the run is still being fetched), and under the virtual time it needs
    to wait for the page the deployment's form stayed greyed out as if still loading."""
    from websockets.sync.client import connect

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    profile = Path(tempfile.mkdtemp(prefix="chromium-shots-"))
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--window-size={size}", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Chromium writes the port it picked (first line) and its browser endpoint (second line) here
        port_file, end = profile / "DevToolsActivePort", time.monotonic() + seconds
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > end:
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            ids = iter(range(1, 1 << 30))

            def call(method: str, **params) -> dict:
                i = next(ids)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while True:  # events arrive between the answers; only the answer to this call is kept
                    msg = json.loads(ws.recv(timeout=seconds))
                    if msg.get("id") == i:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg["result"]

            def until(js: str, what: str) -> None:
                end = time.monotonic() + seconds
                while not call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value"):
                    if time.monotonic() > end:
                        raise TimeoutError(f"{url}: {what} in {seconds} s")
                    time.sleep(0.5)

            width, height = (int(v) for v in size.split(","))  # the viewport exactly: the window's frame takes some
            call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            ready = f"document.body.innerText.includes({json.dumps(shows)})"
            if tab is not None:
                # the UI's tabs: <ul role="tablist"><li class="p-tab [p-tab__active]">label</li>...</ul>
                find = (f"[...document.querySelectorAll('[role=tablist] > *')]"
                        f".find(e => e.textContent.trim() === {json.dumps(tab)})")
                until(f"!!{find}", f"no tab {tab!r}")
                call("Runtime.evaluate", expression=f"{find}.click()")
                # another tab may hold the text too (the logs say `Reused`): it counts once the clicked tab is active
                ready = f"{find}.classList.contains('p-tab__active') && {ready}"
            until(ready, f"{shows!r} not shown")
            time.sleep(2)  # badges, durations and the run graph settle after the text first appears
            png = call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(png))
        print(f"wrote {out}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


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
from llm_compress.flows.pipeline import REUSED, compress
from llm_compress.config import load_recipe
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
recipe, artifacts = load_recipe('configs/tiny.yaml'), {str(home / 'artifacts')!r}
compress(recipe=recipe, run_name='tiny-ui', artifacts_dir=artifacts)
state = compress(recipe=recipe, run_name='tiny-ui-rerun', artifacts_dir=artifacts, return_state=True)
run_id = state.state_details.flow_run_id
with get_client(sync_client=True) as c:
    tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    names = [t.state.name if t.state else None for t in tasks]
if not names or set(names) != {{REUSED}}:
    raise SystemExit(f'the rerun reused not every stage: task states {{names}}')
dep = compress.to_deployment(name='demo', cron='0 2 * * *',
                             parameters={{'recipe': load_recipe('configs/demo.yaml').model_dump(mode='json')}})
dep_id = dep.apply()
print(json.dumps({{'run': str(run_id), 'deployment': str(dep_id)}}))
"""
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:  # the runs' own log says why (a failed stage, a stage that was not reused)
            raise SystemExit(f"the runs failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
        ids = json.loads(out.stdout.strip().splitlines()[-1])
        ui = f"http://127.0.0.1:{a.port}"
        docs, deployment = Path(a.out), f"{ui}/deployments/deployment/{ids['deployment']}"
        # the rerun's task list, where each stage's state name reads `Reused`; 1200 px tall: the run's header and
        # graph above, all six stages' rows below
        shoot(f"{ui}/runs/flow-run/{ids['run']}", docs / "prefect-run.png", shows="Reused", tab="Task Runs",
              size="1600,1200")
        shoot(f"{deployment}/run", docs / "prefect-form.png", shows="Models")  # the recipe's first sections
        shoot(deployment, docs / "prefect-deployment.png", shows="every day")  # its cron schedule, once loaded
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
