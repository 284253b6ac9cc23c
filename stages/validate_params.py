"""Stage `validate_params`: params.yaml against the schema and the seed's rules, before any compute."""

from __future__ import annotations

import logging

from pipeline.io import write_json, write_text
from pipeline.params import ParamsError, load_params
from pipeline.rules import check_rules, render_report, summary
from pipeline.stage import fail, parser, setup_logging

log = logging.getLogger("validate_params")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--metrics", required=True, help="counts of errors and warnings (JSON)")
    ap.add_argument("--report", required=True, help="readable report (Markdown)")
    ap.add_argument("--stamp", required=True, help="written only when validation passes")
    args = ap.parse_args()
    setup_logging()

    try:
        params = load_params(args.params)
    except ParamsError as err:
        write_json(args.metrics, {"errors": len(err.problems), "warnings": 0, "schema_errors": len(err.problems)})
        write_text(args.report, "# params.yaml validation\n\n**FAILED** (schema):\n\n"
                   + "".join(f"- {p}\n" for p in err.problems))
        fail(str(err))
        return

    violations = check_rules(params)
    for v in violations:
        (log.error if v.severity == "error" else log.warning)(str(v))
    counts = summary(violations)
    write_json(args.metrics, {**counts, "schema_errors": 0})
    write_text(args.report, render_report(violations))
    if counts["errors"]:
        fail(f"params.yaml breaks {counts['errors']} rule(s); see {args.report}")
    write_text(args.stamp, "params.yaml passed the schema and every error-level rule (pipeline/rules.py)\n")
    log.info("params.yaml valid: %d warning(s), %d rules checked", counts["warnings"], counts["rules_checked"])


if __name__ == "__main__":
    main()
