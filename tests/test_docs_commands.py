"""Every command of README.md and docs/*.md runs as written.

Each fenced block of `bash`, `sh` or `console` (its `$ ` lines) is read command by command
(continuation lines joined, comments dropped, `$(...)` checked as a command of its own). A word after
the language marks a block whose commands cannot run on a CPU in a temporary clone:

    gpu     needs CUDA (the GPU check, torchrun over GPUs)
    remote  needs shared storage or a git remote (dvc push/pull to a team's bucket)
    server  runs until stopped (mlflow ui)
    make    make targets (set up .venv/, run the test suite): checked to exist

The fast test parses every command: the project's modules with their own argparse parser (nothing
runs), dvc commands with DVC's parser, `-S` keys against params.yaml, make targets against the
Makefile. The long test runs every unmarked command in order, at the tiny scale (`--scale cpu` and
`_cpu` read as `tiny`), in a temporary clone whose committed params.yaml is the tiny scale's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.experiments.runner import parse_sets
from pipeline.params import flatten
from tests.helpers import REPO, TINY, commit_all, copy_repo, run, tool_env, write_params

MARKERS = {"gpu", "remote", "server", "make"}
SHELLS = {"bash", "sh", "console"}
FENCE = re.compile(r"^```(\w*)\s*(.*)$")
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str
    marker: str  # "" when it runs on a CPU

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def commands(page: Path) -> list[Command]:
    """The commands of a page's shell blocks, in order."""
    out, block, pending, start = [], None, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(line.strip())
        if block is None:
            if fence and fence.group(1):
                block = (fence.group(1), fence.group(2).split()[0] if fence.group(2) else "")
            continue
        if line.strip() == "```":
            block = None
            continue
        if block[0] not in SHELLS:
            continue
        text = line.strip()
        if block[0] == "console":
            if not text.startswith("$ "):
                continue
            text = text[2:]
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        if shlex.split(text, comments=True):
            out.append(Command(str(page.relative_to(REPO)), start, text, block[1]))
    return out


ALL = [c for page in PAGES for c in commands(page)]


def test_every_block_marker_is_known():
    unknown = [f"{c.where}: {c.marker}" for c in ALL if c.marker and c.marker not in MARKERS]
    assert not unknown, f"unknown fence markers (known: {', '.join(sorted(MARKERS))}): {unknown}"
    assert len(ALL) > 30  # the pages hold dozens of commands: the reader found them


class Parsed(Exception):
    """Raised by the patched argparse once a module's arguments parsed: nothing runs."""


def parse_module(module: str, args: list[str], monkeypatch) -> argparse.Namespace:
    original = argparse.ArgumentParser.parse_args

    def parse(self, argv=None, namespace=None):
        raise Parsed(original(self, argv, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse)
        m.setattr(sys, "argv", [module, *args])
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        except Parsed as parsed:
            return parsed.args[0]
        except SystemExit as err:
            raise AssertionError(f"python -m {module} {' '.join(args)}: does not parse (exit {err.code})") from None
    raise AssertionError(f"python -m {module} {' '.join(args)}: parsed no arguments")


def words(text: str) -> list[str]:
    """A command's words, without comments and redirections."""
    out, it = [], iter(shlex.split(text, comments=True))
    for w in it:
        if w in (">", ">>", "2>", "<"):
            next(it, None)
        elif not w.startswith(">"):
            out.append(w)
    return out


BASE = flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))


def check(text: str, marker: str, monkeypatch) -> None:
    for inner in SUBSTITUTION.findall(text):
        check(inner, marker, monkeypatch)
    argv = words(SUBSTITUTION.sub("", text))
    program, args = argv[0], argv[1:]
    if program in ("python", "python3") and args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module.split(".")[0] not in ("pipeline", "stages", "benchmarks"):
            assert marker, f"`{text}`: python -m {module} is not the project's: mark the block"
            return
        ns = parse_module(module, rest, monkeypatch)
        if getattr(ns, "sets", None):
            parse_sets(ns.sets, BASE)  # the runner's own check: unknown keys are refused
    elif program == "dvc":
        from dvc.cli.parser import get_main_parser

        try:
            ns = get_main_parser().parse_args(args)
        except SystemExit:
            raise AssertionError(f"`{text}`: DVC does not parse it") from None
        for s in getattr(ns, "set_param", None) or []:
            for item in s if isinstance(s, list) else [s]:
                key = item.partition("=")[0]
                assert key in BASE, f"`{text}`: -S {key} is not a key of params.yaml"
    elif program == "make":
        assert marker == "make", f"`{text}`: mark the block `make`"
        assert set(a for a in args if "=" not in a) <= MAKE_TARGETS, f"`{text}`: no such make target"
    elif program in ("source", "git", "cd"):
        return
    else:
        assert marker, f"`{text}`: {program} is not a command this test knows: mark the block"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("command", ALL, ids=[c.where for c in ALL])
def test_every_command_parses(command, monkeypatch):
    check(command.text, command.marker, monkeypatch)


def test_plots_draw_the_top_level_definitions_only(tmp_path):
    """`dvc plots show/diff` draws the four plots dvc.yaml defines, no fifth titled after the series file."""
    defined = [next(iter(p)) for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]]
    run(["git", "init", "-q"], tmp_path)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path)
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    series = tmp_path / "metrics" / "train" / "epochs.tsv"
    series.parent.mkdir(parents=True)
    columns = sorted({c for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
                      for cols in next(iter(p.values()))["y"].values() for c in cols})
    series.write_text("\t".join(["epoch", *columns]) + "\n" + "\t".join(["1", *["0.5"] * len(columns)]) + "\n")
    shown = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], tmp_path).stdout)
    assert sorted(shown.get("data", shown)) == sorted(defined)


def test_make_run_interrupted_exits_by_sigint(tmp_path):
    """`make run`'s recipe as written: when its command ends with status 130 (Ctrl-C reached it, not
    make), make stops by SIGINT too, so that the shell shows 130 as the docs say, not make's 2."""
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    for name in ("requirements.txt", "requirements.lock"):
        (tmp_path / name).write_text("")
    fake = tmp_path / ".venv" / "bin" / "python"  # the recipe's `python`: interrupted, as the runner ends
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 130\n")
    fake.chmod(0o755)
    stamp = tmp_path / ".venv" / ".installed"
    stamp.write_text("")
    os.utime(stamp, (2**31 - 1, 2**31 - 1))  # set up already
    # as from a user's shell: not a sub-make of `make test`, and with SIGINT's default action (a pytest-xdist
    # worker ignores SIGINT, and an ignored signal stays ignored in the processes it starts)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == -signal.SIGINT, (proc.returncode, proc.stdout, proc.stderr)


def test_make_run_passes_sigterm_on_and_waits_for_the_launcher(tmp_path):
    """SIGTERM to make alone (a batch scheduler's end): make passes it to its recipe's shell only; the
    recipe passes it on to the launcher, which stops (in the real one: the queue) while make waits."""
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    for name in ("requirements.txt", "requirements.lock"):
        (tmp_path / name).write_text("")
    fake = tmp_path / ".venv" / "bin" / "python"  # the recipe's `python`: stops a second after SIGTERM
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\ntrap 'sleep 1; echo launcher: stopped by SIGTERM; exit 143' TERM\n"
                    "echo launcher: running\nwhile :; do sleep 0.1; done\n")
    fake.chmod(0o755)
    stamp = tmp_path / ".venv" / ".installed"
    stamp.write_text("")
    os.utime(stamp, (2**31 - 1, 2**31 - 1))  # set up already
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    log = tmp_path / "make.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["make", "run"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while "launcher: running" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM, log.read_text()
    assert "launcher: stopped by SIGTERM" in log.read_text()  # make ended after the launcher stopped


TINY_WORDS = [("--scale cpu", "--scale tiny"), ("_cpu", "_tiny")]
RUNNABLE = [c for c in ALL if not c.marker and words(c.text)[0] != "source"]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("docs"))
    write_params(repo, **TINY)  # HEAD is the tiny scale: `dvc repro` and `dvc exp run` run it on a CPU
    commit_all(repo, "baseline at the tiny scale")
    return repo


@pytest.mark.e2e
@pytest.mark.long
@pytest.mark.parametrize("command", RUNNABLE, ids=[c.where for c in RUNNABLE])
def test_every_cpu_command_runs_at_the_tiny_scale(command, clone):
    text = command.text
    for cpu, tiny in TINY_WORDS:
        text = text.replace(cpu, tiny)
    proc = subprocess.run(["bash", "-c", text], cwd=clone, env=tool_env(), capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, f"{command.where}: `{text}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
