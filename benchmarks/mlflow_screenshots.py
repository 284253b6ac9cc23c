"""Screenshots of MLflow's UI on a tiny-scale store, in a real headless browser: the pictures of
docs/mlflow.md (docs/mlflow/*.png) and the check that the links of `python -m pipeline.tracking.ui`
open where the docs say.

    python -m benchmarks.mlflow_screenshots [--repo DIR] [--out docs/mlflow]

Without --repo it copies this repository (its committed HEAD) into a temporary directory and runs
`python -m pipeline.experiments run --scale tiny stable fixed trm` there (about 2 minutes on 2 cores);
with --repo it uses the store (`mlflow.db`) of a repository where such experiments ran. It then
starts `mlflow server` on that store, takes one screenshot per link with Chromium (`chromium
--headless --screenshot`; Debian: `apt-get install chromium`), reduces each to a 64-colour PNG and
stops the server.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

from benchmarks.common import REPO

log = logging.getLogger("mlflow_screenshots")
WINDOW = "1680,960"  # wide enough for a chart beside MLflow's assistant panel
SHOTS = {  # file -> the start of the title of a link of pipeline.tracking.ui
    "training_runs.png": "training runs of",
    "attention_entropy.png": "attention entropy",
    "lora.png": "HyperLoRA",
}


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "screenshots", "GIT_AUTHOR_EMAIL": "screenshots@localhost",
            "GIT_COMMITTER_NAME": "screenshots", "GIT_COMMITTER_EMAIL": "screenshots@localhost"}


def tiny_store(root: Path) -> Path:
    """A copy of HEAD with the tiny stable, fixed and TRM experiments run in it."""
    repo = root / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    log.info("running the tiny experiments in %s (about 2 minutes)", repo)
    subprocess.run([sys.executable, "-m", "pipeline.experiments", "run", "--scale", "tiny", "stable", "fixed", "trm"],
                   cwd=repo, env=env(), check=True, stdout=subprocess.DEVNULL)
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout_s:.0f} s")


def screenshot(url: str, path: Path) -> None:
    """The page after its scripts ran (virtual time), as a 64-colour PNG."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={WINDOW}", "--virtual-time-budget=25000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=None, help="a repository whose mlflow.db holds tiny experiments")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlflow-shots-") as tmp:
        repo = (args.repo or tiny_store(Path(tmp))).resolve()
        uri, port = f"sqlite:///{repo / 'mlflow.db'}", free_port()
        host = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  env={**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job workers
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until_up(host, server)
            from pipeline.params import load_params
            from pipeline.tracking.ui import links

            os.environ["MLFLOW_TRACKING_URI"] = uri
            found = links(load_params(repo / "params.yaml"), host)
            args.out.mkdir(parents=True, exist_ok=True)
            for name, start in SHOTS.items():
                [url] = [u for title, u in found.items() if title.startswith(start)]
                screenshot(url, args.out / name)
                log.info("%s: %s (%.0f kB)", args.out / name, url[:100], (args.out / name).stat().st_size / 1e3)
        finally:  # the server and its uvicorn worker: the process group it leads
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
