"""Experiments side by side, each one or more seed repeats of one configuration at one scale: every
value is the mean and spread over the repeats, and a difference is called real only when it exceeds
the spread.

A group is what `python -m pipeline.experiments` names `stable_cpu`: the repeats `stable_cpu`,
`stable_cpu_s43`, ... (one seed each). Per metric a group has the mean and the standard deviation over
its repeats; two groups differ for real when the distance between their means is larger than the sum
of their standard deviations (their mean ± sd intervals do not overlap), otherwise the difference is
"within noise". With one seed in a group the spread is unknown, and no difference is called real.

A status (ok, warning, critical: `*_status` in metrics/gap.json, stored as 0, 1, 2) is a category:
two groups' statuses are the same, different or mixed, never averaged. A measure that a group's
model does not have (TRM has no DSC attention entropy, stop value, LoRA or leave-one-out) is "not
measured" for it: no winner is named for it and it counts in no status of the comparison.

The report (`compare`) states the scale and the seeds, the params each group changes beyond its scale
and seed, one table of every gap measure (the closest to no gap named only when it is closer for real)
with the status over the measures every group has, the evaluation metrics, every metric that differs
for real from the first group, and one set of training curves of the measures every group has (each
group's mean over its repeats). `metrics_table` is the `dvc metrics diff`-style table of every metric
of two groups. Outputs are read from each experiment's DVC commit.
"""

from __future__ import annotations

import functools
import io
import json
import math
import statistics
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.experiments.committed import changed_values, yaml_value
from pipeline.io import atomic_path
from pipeline.monitor import STATUS_CODE
from pipeline.params import SEED_KEYS, flatten, parse_yaml

if TYPE_CHECKING:
    import pandas as pd

GAP_MEASURES = ("exact_match_gap", "exact_match_relative_gap", "attention_entropy_ratio", "stop_value_gap",
                "loss_ratio")
RATIOS = {"attention_entropy_ratio", "loss_ratio"}  # 1 is no gap
STATUS = {code: name for name, code in STATUS_CODE.items()}
METRICS = {"train": "metrics/train.json", "eval": "metrics/eval.json", "gap": "metrics/gap.json"}
ONE_SEED = "spread unknown (one seed)"
NOT_MEASURED = "not measured"
RULE = ("mean ± standard deviation over the seeds; a difference is real when it is larger than the sum of the "
        "two standard deviations, otherwise within noise; statuses are categories (same, different, mixed)")
SEVERITY = {name: code for code, name in STATUS.items()}  # ok < warning < critical


class CompareError(ValueError):
    """Experiments that cannot be compared: an output is missing."""


@dataclass(frozen=True)
class Group:
    """Seed repeats of one configuration at one scale."""
    label: str  # e.g. stable_cpu
    scale: str | None  # None: not known (an experiment not made by the runner)
    revs: dict[str, str]  # DVC experiment name -> its commit
    scale_overrides: dict[str, Any] = field(default_factory=dict)  # the scale's: not this group's own changes


@dataclass(frozen=True)
class Outputs:
    """What one experiment wrote, read from its commit."""
    rev: str
    metrics: dict[str, float]  # every number of METRICS but statuses: train.<key>, eval.<side>.<key>, gap.<view>.<key>
    statuses: dict[str, str]  # gap.<view>.<measure>_status, gap.<view>.status, gap.overall_status: ok/warning/critical
    gap: dict[str, Any]  # metrics/gap.json
    series: pd.DataFrame  # metrics/train/epochs.tsv
    params: dict[str, Any]  # params.yaml, flat
    changes: dict[str, tuple[Any, Any]]  # params.yaml against the experiment's baseline (its parent commit)

    @property
    def seed(self) -> str:
        seeds = {self.params.get(k) for k in SEED_KEYS}
        return str(seeds.pop()) if len(seeds) == 1 else "/".join(str(self.params.get(k)) for k in SEED_KEYS)


@dataclass(frozen=True)
class Spread:
    """One metric over the repeats of a group."""
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def text(self, fmt: str = ".4g") -> str:
        return f"{self.mean:{fmt}}" + (f" ± {self.sd:{fmt}}" if self.sd is not None else "")


def is_status(key: str) -> bool:
    """Whether a metric is a status code (0 ok, 1 warning, 2 critical), a category and not a quantity."""
    return key.endswith("_status") or key.rsplit(".", 1)[-1] == "status"


def statuses_text(found: set[str]) -> str:
    """The statuses of a group's repeats, mildest first: `ok`, `ok/warning`."""
    return "/".join(sorted(found, key=SEVERITY.__getitem__))


def status_verdict(a: set[str], b: set[str]) -> str:
    """Two groups' statuses over their repeats: 'same' (every repeat the one status), 'different' (no
    status in common) or 'mixed' (some repeats agree, some do not)."""
    if a == b and len(a) == 1:
        return "same"
    return "different" if not a & b else "mixed"


def verdict(a: Spread, b: Spread) -> str:
    """'same', 'real', 'within noise', or ONE_SEED: is b's mean different from a's beyond their spread?"""
    difference = b.mean - a.mean
    if math.isclose(difference, 0.0, rel_tol=1e-9, abs_tol=1e-12):
        return "same"
    if a.sd is None or b.sd is None:
        return ONE_SEED
    return "real" if abs(difference) > a.sd + b.sd else "within noise"


def closest(distances: dict[str, Spread]) -> tuple[str | None, str]:
    """(the group whose gap is closer to none than every other's for real, or None; what to write):
    the name, 'tie' when every mean is the same, else why there is no winner."""
    best = min(distances, key=lambda g: distances[g].mean)
    verdicts = [verdict(distances[best], d) for g, d in distances.items() if g != best]
    if all(v == "same" for v in verdicts):
        return None, "tie"
    if all(v == "real" for v in verdicts):
        return best, best
    return None, ONE_SEED if ONE_SEED in verdicts else "within noise"


def distance(measure: str, value: float) -> float:
    """How far a gap is from none: |value|, or |log ratio| for ratios."""
    if measure in RATIOS:
        return abs(math.log(max(value, 1e-12)))
    return abs(value)


@functools.lru_cache(maxsize=64)
def _files_at(rev: str, cwd: Path) -> Any:
    from dvc.api import DVCFileSystem

    return DVCFileSystem(str(cwd), rev=rev)


def read_at(rev: str, path: str, cwd: Path) -> str:
    """A file as experiment commit `rev` has it: in git, or in DVC's cache through the commit's
    dvc.lock (the metrics are cached outputs)."""
    try:
        return _files_at(rev, cwd).read_text(path)
    except FileNotFoundError:
        raise CompareError(f"{path} is not in experiment commit {rev[:7]} (nor in DVC's cache)") from None


def numbers(tree: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric leaves of a metrics file (not booleans, not missing values), with dotted keys."""
    return {k: float(v) for k, v in flatten(tree, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def read_outputs(rev: str, cwd: Path) -> Outputs:
    import pandas as pd  # here: the runner refuses bad input before pandas would have loaded (2 s)

    files = {name: json.loads(read_at(rev, path, cwd)) for name, path in METRICS.items()}
    text = read_at(rev, "params.yaml", cwd)
    base = subprocess.run(["git", "show", f"{rev}^:params.yaml"], cwd=cwd, capture_output=True, text=True)
    changes = changed_values(base.stdout, text) if base.returncode == 0 else {}
    found = {k: v for name, tree in files.items() for k, v in numbers(tree, f"{name}.").items()}
    return Outputs(rev, {k: v for k, v in found.items() if not is_status(k)},
                   {k: STATUS[int(v)] for k, v in found.items() if is_status(k)}, files["gap"],
                   pd.read_csv(io.StringIO(read_at(rev, "metrics/train/epochs.tsv", cwd)), sep="\t"),
                   flatten(parse_yaml(text, f"params.yaml of {rev[:7]}") or {}), changes)


def spread(runs: list[Outputs], key: str) -> Spread | None:
    values = tuple(r.metrics[key] for r in runs if key in r.metrics)
    return Spread(values) if values else None


def _own_changes(group: Group, runs: list[Outputs]) -> str:
    """What the group's repeats change from their baseline beyond the scale and the seed; a line that
    says so when the repeats do not agree (a key inherited by one of them)."""
    scale = group.scale_overrides
    own = [{k: new for k, (_, new) in r.changes.items() if k not in SEED_KEYS and (k not in scale or scale[k] != new)}
           for r in runs]
    text = ", ".join(f"{k}={yaml_value(v)}" for k, v in own[0].items()) or "none (the baseline)"
    if any(o != own[0] for o in own[1:]):
        differing = sorted({k for o in own for k in o if any(p.get(k) != o.get(k) for p in own)})
        text += f" -- WARNING: its repeats differ in {', '.join(differing)}"
    return text


def render(groups: dict[str, Group], outputs: dict[str, list[Outputs]]) -> str:
    """The Markdown report (without the curves)."""
    labels = list(groups)
    scales = sorted({g.scale or "unknown" for g in groups.values()})
    lines = [f"# {' vs '.join(labels)}", "",
             f"Scale: {', '.join(scales)}." + (" WARNING: experiments of different or unknown scales: their "
                                                "differences include the scale's." if len(scales) > 1 or
                                                scales == ["unknown"] else ""),
             "Seeds: " + "; ".join(f"{g} {', '.join(r.seed for r in outputs[g])}" for g in labels) + ".",
             f"Values: {RULE}.", "",
             "| group | experiments | changes beyond the scale and the seed |", "|---|---|---|"]
    for g in labels:
        exps = ", ".join(f"{n} ({rev[:7]})" for n, rev in groups[g].revs.items())
        lines.append(f"| {g} | {exps} | {_own_changes(groups[g], outputs[g])} |")
    views = [v for v in ("training", "evaluation") if all(v in r.gap for runs in outputs.values() for r in runs)]
    measured = {(view, m): [g for g in labels if all(m in r.gap[view] for r in outputs[g])]
                for view in views for m in GAP_MEASURES}
    shared = [vm for vm, present in measured.items() if len(present) == len(labels)]
    lines += ["", "Gaps: distance from no gap is |gap| for differences, |log ratio| for ratios. A measure a "
              f"group's model does not have is {NOT_MEASURED} (the DSC's attention entropy and stop value of a "
              "TRM): no group is named closest for it and it counts in no status. The status row grades each "
              "group over the measures every group has.", "",
              f"| gap | {' | '.join(labels)} | closest to no gap |", "|---|" + "---|" * (len(labels) + 1)]
    for (view, m), present in measured.items():
        if not present:
            continue
        values = {g: Spread(tuple(r.gap[view][m] for r in outputs[g])) for g in present}
        dists = {g: Spread(tuple(distance(m, r.gap[view][m]) for r in outputs[g])) for g in present}
        if len(present) < len(labels):
            winner, said = None, f"not compared ({NOT_MEASURED} by {', '.join(g for g in labels if g not in present)})"
        else:
            winner, said = closest(dists) if len(present) > 1 else (None, "—")
        cells = []
        for g in labels:
            if g not in present:
                cells.append(NOT_MEASURED)
                continue
            status = statuses_text({STATUS[r.gap[view][m + "_status"]] for r in outputs[g]})
            cell = values[g].text(".4f")
            cells.append((f"**{cell}**" if g == winner else cell) + f" ({status})")
        lines.append(f"| {view}: {m} | {' | '.join(cells)} | {said} |")
    graded = {g: {shared_status(r, shared) for r in outputs[g]} for g in labels}
    agreed = {status_verdict(graded[labels[0]], graded[g]) for g in labels[1:]}
    said = next((v for v in ("different", "mixed", "same") if v in agreed), "—")
    lines.append("| status over the measures every group has | " + " | ".join(statuses_text(graded[g]) for g in labels)
                 + f" | {said} |")
    lines += ["", f"| evaluation | {' | '.join(labels)} |", "|---|" + "---|" * len(labels)]
    keys = list(dict.fromkeys(k for g in labels for r in outputs[g] for k in r.metrics if k.startswith("eval.")))
    for k in keys:
        cells = [s.text() if (s := spread(outputs[g], k)) is not None else NOT_MEASURED for g in labels]
        lines.append(f"| {k.removeprefix('eval.')} | {' | '.join(cells)} |")
    for g in labels[1:]:
        lines += ["", f"## {g} against {labels[0]}", "",
                  differences_summary(outputs[labels[0]], outputs[g], (labels[0], g))]
    return "\n".join(lines) + "\n"


def shared_status(run: Outputs, measures: Iterable[tuple[str, str]]) -> str:
    """A run's worst status over these (view, measure) gaps: ok when none is graded worse."""
    return max((STATUS[run.gap[view][m + "_status"]] for view, m in measures), key=SEVERITY.__getitem__,
               default="ok")


@dataclass(frozen=True)
class Row:
    """One metric of two groups, as the tables show it."""
    metric: str
    a: str
    b: str
    difference: str  # of the means; "" for a status
    verdict: str  # same, real, within noise, ONE_SEED; for a status: same, different, mixed


def rows(a: list[Outputs], b: list[Outputs]) -> list[Row]:
    """Every metric both groups measured: the numbers as mean ± sd with their verdict, then the
    statuses as categories."""
    out = []
    for key in a[0].metrics:
        sa, sb = spread(a, key), spread(b, key)
        if sa is not None and sb is not None:
            out.append(Row(key, sa.text(), sb.text(), f"{sb.mean - sa.mean:+.4g}", verdict(sa, sb)))
    shared = gap_keys(a) & gap_keys(b)
    for key in a[0].statuses:
        if is_aggregate(key):  # a view's or the overall status: over the gaps both groups measured
            view = key.split(".")[1]
            measures = [vm for vm in shared if key == "gap.overall_status" or vm[0] == view]
            found_a, found_b = ({shared_status(r, measures) for r in runs} for runs in (a, b))
            if gap_keys(a) != gap_keys(b):
                key += " (over the gaps both measured)"
        else:
            found_a, found_b = ({r.statuses[key] for r in runs if key in r.statuses} for runs in (a, b))
        if found_a and found_b:
            out.append(Row(key, statuses_text(found_a), statuses_text(found_b), "", status_verdict(found_a, found_b)))
    return out


def is_aggregate(key: str) -> bool:
    """`gap.<view>.status` or `gap.overall_status`: the worst of several gaps' statuses."""
    return key == "gap.overall_status" or (key.startswith("gap.") and key.endswith(".status"))


def gap_keys(runs: list[Outputs]) -> set[tuple[str, str]]:
    """The (view, measure) gaps every run of a group measured."""
    return set.intersection(*({(view, m) for view, gaps in r.gap.items() if isinstance(gaps, dict)
                               for m in GAP_MEASURES if m in gaps} for r in runs))


def unmeasured(a: list[Outputs], b: list[Outputs]) -> list[str]:
    """The metrics only one of the two groups measured."""
    keys = [{k for r in runs for k in (*r.metrics, *r.statuses)} for runs in (a, b)]
    return sorted(keys[0] ^ keys[1])


def differences_summary(a: list[Outputs], b: list[Outputs], names: tuple[str, str]) -> str:
    """The metrics that differ for real (statuses: that differ), how many do not, and how many only
    one group measured."""
    found = rows(a, b)
    real = [r for r in found if r.verdict in ("real", "different")]
    counts = {v: sum(r.verdict == v for r in found) for v in ("within noise", ONE_SEED, "mixed", "same")}
    alone = unmeasured(a, b)
    text = (f"{len(real)} of {len(found)} metrics differ beyond the spread (statuses: differ); "
            + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + "."
            + (f" {len(alone)} metric(s) measured by one of them only ({NOT_MEASURED} by the other, not "
               "compared)." if alone else ""))
    if real:
        text += "\n\n" + table(real, names)
    return text


def table(found: list[Row], names: tuple[str, str]) -> str:
    lines = [f"| metric | {names[0]} | {names[1]} | difference | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.metric} | {r.a} | {r.b} | {r.difference} | {r.verdict} |" for r in found]
    return "\n".join(lines)


def read_groups(groups: dict[str, Group], cwd: Path) -> dict[str, list[Outputs]]:
    return {g: [read_outputs(rev, cwd) for rev in group.revs.values()] for g, group in groups.items()}


def metrics_table(a: Group, b: Group, cwd: Path) -> str:
    """Every metric of two groups: mean ± sd of each, the difference of the means and its verdict."""
    outputs = read_groups({a.label: a, b.label: b}, cwd)
    found = rows(outputs[a.label], outputs[b.label])
    head = (f"{a.label} ({len(a.revs)} seed(s)) vs {b.label} ({len(b.revs)} seed(s)), scale "
            f"{a.scale or 'unknown'}{'' if a.scale == b.scale else ' vs ' + (b.scale or 'unknown')}; {RULE}.")
    return f"{head}\n\n{table(found, (a.label, b.label))}\n"


def mean_series(runs: list[Outputs]) -> pd.DataFrame:
    import pandas as pd

    """The per-epoch series averaged over the repeats."""
    if len(runs) == 1:
        return runs[0].series
    return pd.concat([r.series for r in runs]).groupby("epoch", as_index=False).mean(numeric_only=True)


def shared_series(series: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Each group's series cut to the measures every group has (at some epoch); and those left out."""
    measured = [{c for c in df.columns if c != "epoch" and df[c].notna().any()} for df in series.values()]
    shared = set.intersection(*measured)
    keep = {g: df[["epoch", *(c for c in df.columns if c in shared)]] for g, df in series.items()}
    return keep, sorted(set.union(*measured) - shared)


def compare(groups: dict[str, Group], cwd: Path, out: Path) -> str:
    """Write `out/compare.md` and the overlaid curves of the groups (each one's mean over its repeats);
    return the Markdown."""
    from pipeline.report import plot_curves

    outputs = read_groups(groups, cwd)
    text = render(groups, outputs)
    series, left_out = shared_series({g: mean_series(runs) for g, runs in outputs.items()})
    starts = {g: int(runs[0].params["train.meta_learning_start_epoch"]) for g, runs in outputs.items()}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        figures = plot_curves(series, tmp, starts)
        text += ("\n## Curves\n\nEach group's mean over its seeds, for the measures every group has"
                 + (f" ({NOT_MEASURED} by some, not drawn: {', '.join(left_out)}; each experiment's gap report "
                    "draws its own)" if left_out else "") + ".\n\n"
                 + "".join(f"![{title}]({name})\n" for name, title in figures))
        (tmp / "compare.md").write_text(text)
    return text
