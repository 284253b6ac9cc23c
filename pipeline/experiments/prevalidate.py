"""Every planned experiment's params checked before anything runs: what the validate_params stage of
each would check (the schema and every error-level rule, pipeline.rules), on HEAD's params.yaml plus
its overrides, and each `-S key=value` against the override grammar DVC parses it with. A bad value
(`-S train.epochs=-3`, `-S model.hidden_dim=abc`, `-S 'data.source=a; touch x'`) is refused in a
second, naming the experiment and the value, instead of after the experiments before it trained."""

from __future__ import annotations

from typing import Any

from pipeline.experiments.committed import set_args
from pipeline.params import Params, ParamsError, shorten
from pipeline.rules import check_rules


def grammar_problem(arg: str) -> str | None:
    """Why DVC's `-S` parser (Hydra's override grammar) refuses `key=value`, or None when it accepts it."""
    from dvc.utils.hydra import to_hydra_overrides
    from hydra.errors import HydraException

    try:
        to_hydra_overrides([arg])
    except HydraException as err:
        where = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        return (f"-S {shorten(arg)}: DVC's override grammar refuses this value ({shorten(where, 160)}); "
                "characters such as ; $ ( ) ` | & cannot be passed to `dvc exp run -S`")
    return None


def problems_of(changes: dict[str, Any], head: Params) -> list[str]:
    """What stops an experiment of these overrides (dotted key -> value) on HEAD's params: lines naming
    the value, or none."""
    refused = [p for arg in set_args(changes)[1::2] if (p := grammar_problem(arg)) is not None]
    if refused:
        return refused
    try:
        params = head.override(changes)
    except ParamsError as err:
        return err.problems
    return [f"breaks rule {v.rule.id}: {v}" for v in check_rules(params) if v.severity == "error"]


def check(planned: dict[str, dict[str, Any]], head: Params) -> None:
    """ParamsError listing, per experiment name, every problem of its overrides (`problems_of`)."""
    found = [f"{name}: {line}" for name, changes in planned.items() for line in problems_of(changes, head)]
    if found:
        raise ParamsError(found, "the plan (HEAD's params.yaml plus each experiment's overrides)")
