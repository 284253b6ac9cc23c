"""What `make run` runs: a job this machine can finish.

With CUDA, the whole pipeline (`dvc repro`). Without, the stable-versus-fixed workflow at the cpu
scale (`pipeline.experiments`: both experiments side by side in the DVC queue, each with half the
cores, then the compare report), which shows the train/eval mode gap of the gap analysis (docs/sources.md) in minutes, where the full
pipeline would train for months.
`--scale NAME` runs the workflow at that scale on any machine (`make run SCALE=tiny`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pipeline.experiments.runner import DEFAULT, SCALES, child_env, name_of, report_dir
from pipeline.stage import INTERRUPTED, TERMINATED, Stopped, run_foreground, sigterm_stops


def shown(cmd: list[str]) -> str:
    """A command (`python -m` module and arguments) as a user would type it."""
    return " ".join(cmd) if cmd[0] == "dvc" else "python -m " + " ".join(cmd)


def plan(cuda: bool, scale: str | None) -> tuple[list[str], list[list[str]]]:
    """(what to say first, the commands to run as `python -m` module and arguments) for a machine
    with or without CUDA, or for the scale asked for."""
    if scale is None and cuda:
        say = f"make run: CUDA is available: the full pipeline (dvc repro): {SCALES['full'].about}."
        return [say], [["dvc", "repro"]]
    scale, why = (scale, f"SCALE={scale}") if scale else ("cpu", "no CUDA GPU here")
    cmds = [["pipeline.experiments", "run", "--scale", scale, "--queue", "-j", "2", *DEFAULT],
            ["pipeline.experiments", "compare", "--scale", scale, *DEFAULT]]
    labels = [name_of(n, scale) for n in DEFAULT]
    say = [f"make run: {why}: the stable-versus-fixed workflow at the {scale} scale, not the full pipeline:",
           *(f"  {shown(c)}" for c in cmds),
           f"  {scale} scale: {SCALES[scale].about}.",
           f"  Results: `dvc exp show`, `dvc metrics diff {' '.join(labels)}`, "
           f"metrics/compare/{report_dir(labels)}/compare.md.",
           f"  The full pipeline ({SCALES['full'].about}) needs a GPU: with CUDA, `make run` runs `dvc repro`."]
    return say, cmds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), help="run the stable-versus-fixed workflow at this scale")
    args = ap.parse_args(argv)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started as a job of make's shell: Ctrl-C is ours again
        signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    say, cmds = plan(torch.cuda.is_available(), args.scale)
    print("\n".join(say), flush=True)
    env = child_env(Path.cwd())
    for cmd in cmds:
        print(f"$ {shown(cmd)}", flush=True)
        try:
            with sigterm_stops():  # SIGTERM (make passes it on) reaches the runner, which stops its queue
                code = run_foreground([sys.executable, "-m", *cmd], env=env).returncode
        except Stopped:
            print("make run: stopped by SIGTERM; `make run` again resumes each interrupted training from its "
                  "checkpoint", file=sys.stderr)
            sys.exit(TERMINATED)
        except KeyboardInterrupt:
            print("make run: interrupted (Ctrl-C); `make run` again resumes each interrupted training from its "
                  "checkpoint", file=sys.stderr)
            sys.exit(INTERRUPTED)
        if code != 0:
            sys.exit(f"make run: `{shown(cmd)}` failed")


if __name__ == "__main__":
    main()
