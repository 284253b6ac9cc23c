"""MLflow calls that give up in bounded time, and the metrics kept locally while the store is lost.

MLflow's own HTTP client retries a failed request for minutes (7 retries with exponential backoff,
each request waiting up to 120 s). Here every request is one attempt of at most `tracking.timeout_s`
(MLflow's retries are turned off for the process) and every call of `BoundedClient` is retried, with
backoff, for at most `tracking.retry_s` seconds while the cause is transient: the server unreachable,
timing out or answering 5xx/429, a database locked by another process. Then:

- **logging calls** (`log_batch`: metrics, params and tags; `set_terminated`) are kept in a local
  file, one JSON line per call, `<buffer>/<run id>.<pid>.jsonl`, and the caller goes on (training
  continues; one warning says where the calls are kept). While the store is lost the client does not
  wait again: each later call is kept at once, and one attempt is made every `retry_s` seconds; when
  one succeeds, the kept calls are sent first, in their order, and the file is removed.
- **any other call** (create a run, search, log an artifact, register a model) raises
  `TrackingLost`: one line naming the store, the cause and what is kept.

Calls kept by a process that ended before the store came back are sent by the next `connect` to the
same store (the next stage that logs to it), into the runs they belong to.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.io import pid_alive
from pipeline.params import TrackingParams

log = logging.getLogger(__name__)
BUFFERED = ("log_batch", "set_terminated")  # calls kept locally while the store is lost
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 5.0  # backoff between attempts


class TrackingLost(RuntimeError):
    """The MLflow store failed for longer than tracking.retry_s; the message is one line."""


def reason(err: BaseException) -> str:
    """The cause of a failed call in a few words (MLflow's message nests urllib3's)."""
    text = str(err)
    found = (re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(database is locked)", text)
             or re.search(r"(timed out|HTTP \d{3}[^.]*|too many \d{3} error responses)", text))
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    return found.group(1).strip() if found else first[:160]


def transient(err: BaseException) -> bool:
    """Whether a failed call may succeed later: the store unreachable, slow, overloaded or locked.
    A refused request (a 4xx: the run does not exist, a bad value) is not retried."""
    from mlflow.exceptions import MlflowException, RestException

    text = str(err)
    if isinstance(err, RestException):
        return err.get_http_status_code() >= 500 or err.get_http_status_code() == 429
    if "database is locked" in text:
        return True
    if isinstance(err, MlflowException):
        return "API request to" in text and "failed with exception" in text
    return isinstance(err, (ConnectionError, TimeoutError))


def bound_http_requests(timeout_s: int) -> None:
    """One attempt per HTTP request, of at most timeout_s, for every MLflow client of this process
    (the retries are BoundedClient's)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)


def buffer_dir(root: Path, uri: str) -> Path:
    """Where the calls kept for the store at `uri` go (one folder per store)."""
    return root / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _encode(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A kept call as JSON (MLflow's Metric, Param and RunTag entities as lists)."""
    call = dict(zip(("run_id",), args)) | kwargs
    if name == "set_terminated":
        return {"call": name, "run_id": call["run_id"], "status": call.get("status"), "end_time": call.get("end_time")}
    return {"call": name, "run_id": call["run_id"],
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in call.get("metrics") or []],
            "params": [[p.key, p.value] for p in call.get("params") or []],
            "tags": [[t.key, t.value] for t in call.get("tags") or []]}


def _send(client: Any, entry: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    if entry["call"] == "set_terminated":
        client.set_terminated(entry["run_id"], status=entry["status"], end_time=entry["end_time"])
    else:
        client.log_batch(entry["run_id"], metrics=[Metric(*m) for m in entry["metrics"]],
                         params=[Param(*p) for p in entry["params"]], tags=[RunTag(*t) for t in entry["tags"]])


class BoundedClient:
    """An MlflowClient whose calls give up after `retry_s` seconds (see the module's doc)."""

    def __init__(self, uri: str, p: TrackingParams, buffer: Path):
        import mlflow

        bound_http_requests(p.timeout_s)
        self._client = mlflow.MlflowClient(uri)
        self.uri, self.retry_s, self.buffer = uri, p.retry_s, buffer
        self.lost: str | None = None  # why, while the store is lost
        self._lost_at = 0.0
        self.kept = 0  # calls kept in the buffer by this client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return functools.partial(self._kept_if_lost if name in BUFFERED else self.call, name, attr)

    def _file(self, run_id: str, pid: int | None = None) -> Path:
        return self.buffer / f"{run_id}.{pid or os.getpid()}.jsonl"

    def _describe(self, what: str) -> str:
        kept = f"; {self.kept} logging call(s) are kept in {self.buffer} until it is back" if self.kept else ""
        return (f"MLflow store {self.uri} is lost ({self.lost}; retried for {self.retry_s} s, tracking.retry_s) and "
                f"{what} cannot wait for it{kept}; run the stage again once the store works")

    def call(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), retried while the store fails transiently, for at most retry_s seconds
        (one attempt while it is known lost, once per retry_s); TrackingLost when it does not succeed."""
        if self.lost is not None:
            if time.monotonic() - self._lost_at < self.retry_s:
                raise TrackingLost(self._describe(name))
            self._send_kept()
        deadline = time.monotonic() + (self.retry_s if self.lost is None else 0)
        delay = FIRST_DELAY_S
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - classified here: transient or not
                if not transient(err):
                    raise
                if time.monotonic() + delay > deadline:
                    self._lose(reason(err))
                    raise TrackingLost(self._describe(name)) from None
                time.sleep(delay)
                delay = min(2 * delay, MAX_DELAY_S)

    def _lose(self, why: str) -> None:
        if self.lost is None:
            log.warning("MLflow store %s does not answer (%s; retried for %d s, tracking.retry_s): logging calls are "
                        "kept in %s and sent when it is back", self.uri, why, self.retry_s, self.buffer)
        self.lost, self._lost_at = why, time.monotonic()

    def _kept_if_lost(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """A logging call: sent, or kept in the buffer when the store is lost (no error)."""
        try:
            return self.call(name, fn, *args, **kwargs)
        except TrackingLost:
            entry = _encode(name, args, kwargs)
            self.buffer.mkdir(parents=True, exist_ok=True)
            with self._file(entry["run_id"]).open("a") as f:
                f.write(json.dumps(entry) + "\n")
            self.kept += 1
            return None

    def _send_kept(self) -> None:
        """Send this process's kept calls in order (one attempt); the store is back when they all went."""
        for path in sorted(self.buffer.glob(f"*.{os.getpid()}.jsonl")):
            self._replay(path)
        if self.lost is not None:
            log.info("MLflow store %s is back: sent %d kept logging call(s)", self.uri, self.kept)
        self.lost, self.kept = None, 0

    def _replay(self, path: Path) -> int:
        """Send the calls kept in one file, in order; the file goes when all went (what remains is kept
        when the store fails again). TrackingLost when it does."""
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            try:
                _send(self._client, json.loads(line))
            except Exception as err:  # noqa: BLE001
                if not transient(err):  # refused (the run was deleted?): set aside, never sent twice
                    refused = path.with_name(f"{path.name}.refused")
                    path.write_text("".join(f"{rest}\n" for rest in lines[i:]))
                    path.rename(refused)
                    log.warning("MLflow store %s refused a kept call (%s): it and the %d after it stay in %s",
                                self.uri, reason(err), len(lines) - i - 1, refused)
                    return i
                path.write_text("".join(f"{rest}\n" for rest in lines[i:]))
                self._lose(reason(err))
                raise TrackingLost(self._describe("sending the kept calls")) from None
        path.unlink()
        return len(lines)

    def send_pending(self) -> None:
        """Send the calls other processes kept for this store and could not send before they ended."""
        for path in sorted(self.buffer.glob("*.jsonl")) if self.buffer.is_dir() else []:
            pid = path.name.rsplit(".", 2)[-2]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                try:
                    n = self._replay(path)
                except TrackingLost:
                    return
                log.info("MLflow: sent %d logging call(s) kept by process %s into run %s", n, pid,
                         path.name.split(".")[0])


@contextlib.contextmanager
def unless_required(p: TrackingParams) -> Iterator[None]:
    """Logging after a stage's work: a store lost for good ends the stage (TrackingLost) when tracking is
    required; with `tracking.required: false` it is a warning and the stage ends well, its outputs written."""
    try:
        yield
    except TrackingLost as err:
        if p.required:
            raise
        log.warning("%s; going on without MLflow (tracking.required is false)", err)


def connect(uri: str, p: TrackingParams, buffer_root: Path) -> BoundedClient:
    """A BoundedClient for the store, after it sent what earlier processes kept for it."""
    client = BoundedClient(uri, p, buffer_dir(buffer_root, uri))
    client.send_pending()
    return client
