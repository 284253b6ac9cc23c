"""Stage `validate_params`: params.yaml against the schema and the validation rules (docs/configuration.md), before any compute.

It checks what the params are, never what a training of them would cost on this machine: the stages
that do not train (prepare, augment) wait for its stamp, and run on any machine. The cost of
training is the train stage's to refuse (pipeline.feasibility, then pipeline.train.preflight)."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.experiments import runlock
from pipeline.experiments.committed import changes_from_head, describe_changes, restore_hint, yaml_value
from pipeline.io import write_json, write_text
from pipeline.params import ParamsError, load_params
from pipeline.rules import ACCEPT_KEY, check_rules, render_report, summary
from pipeline.stage import fail, parser, run, setup_logging

log = logging.getLogger("validate_params")


def failure(message: str, params_path: str) -> str:
    """The message, and what differs from the committed params file with how to restore it."""
    hint = restore_hint(params_path)
    return f"{message}\n{hint}" if hint else message


def changes_line(changes: dict[str, tuple[Any, Any]] | None) -> str:
    """The report's line of the keys this params.yaml changes from HEAD's, with their values (the
    metrics file holds only their number)."""
    if changes is None:
        return "Differs from HEAD: unknown (params.yaml is not committed here)."
    return "Differs from HEAD: " + (", ".join(f"`{k}={yaml_value(new)}`" for k, (_, new) in changes.items())
                                    or "nothing") + "."


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--metrics", required=True, help="counts of errors and warnings (JSON)")
    ap.add_argument("--report", required=True, help="readable report (Markdown)")
    ap.add_argument("--stamp", required=True, help="written only when validation passes")
    args = ap.parse_args()
    setup_logging()
    try:
        changes = changes_from_head(args.params)
        log.info("%s", describe_changes(changes))  # an inherited override shows here, at the start of every run
    except ParamsError:  # not a params file: load_params below says why, in one line
        changes = None
    differs = {"keys_differing_from_head": len(changes or {})}  # a number: DVC's metrics views take no text

    try:
        params = load_params(args.params)
    except ParamsError as err:
        write_json(args.metrics, {"errors": len(err.problems), "warnings": 0, "schema_errors": len(err.problems),
                                  **differs})
        write_text(args.report, f"# params.yaml validation\n\n{changes_line(changes)}\n\n**FAILED** (schema):\n\n"
                   + "".join(f"- {p}\n" for p in err.problems))
        fail(failure(str(err), args.params))
        return
    runlock.check_stage(args.params)  # when DVC runs it: this workspace is this experiment's

    violations = check_rules(params)
    for v in violations:
        (log.error if v.severity == "error" else log.warning)(str(v))  # accepted errors are warnings
    counts = summary(violations, family=params.model.family)
    write_json(args.metrics, {**counts, "schema_errors": 0, **differs})
    write_text(args.report, render_report(violations, family=params.model.family, preface=changes_line(changes)))
    if counts["errors"]:
        broken = ", ".join(v.rule.id for v in violations if v.severity == "error")
        fail(failure(f"params.yaml breaks {counts['errors']} rule(s): {broken}; see {args.report}. To break one on "
                     f"purpose (a failure mode, an ablation), list its id in {ACCEPT_KEY}", args.params))
    write_text(args.stamp, "params.yaml passed the schema and every error-level rule (pipeline/rules.py)\n")
    log.info("params.yaml valid: %d warning(s), %d accepted error(s), %d rules checked", counts["warnings"],
             counts["accepted_errors"], counts["rules_checked"])


if __name__ == "__main__":
    run(main)
