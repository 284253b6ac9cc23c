"""Cross-key validation rules for params.yaml, taken from the project's two design sources.

The schema (`pipeline.params`) checks each value alone; a rule checks how values fit together:
the stable configuration's validation report (docs/sources.md#validated-configuration) and the
train/eval-gap analysis with its fixed configuration (docs/sources.md#gap-analysis-and-its-fixes).
Each rule has an id, a severity and a message; `check_rules` returns the violations and
`render_report` the readable report of the `validate_params` stage.

An error rule listed in `validation.accept_broken_rules` is broken on purpose (e.g. to re-run a
failure mode that the design sources describe): its violation is "accepted", a recorded warning
counted on its own, never a silent pass. Two rules check the list itself: every id names an error rule, and each is broken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pipeline.params import FAMILIES, HYPERLORA_CODE_DEFAULTS, Params, shorten

Severity = Literal["error", "warning"]
Status = Literal["error", "warning", "accepted"]  # accepted: an error rule broken on purpose

# Samples in the cache per data source when data.max_tasks is null (400+400, 1000+120 tasks).
_TASKS_PER_SOURCE = {"arc-agi-1": (400, 400), "arc-agi-2": (1000, 120)}


@dataclass(frozen=True)
class Rule:
    id: str
    severity: Severity
    keys: tuple[str, ...]
    summary: str  # what must hold
    source: str  # where the rule comes from
    check: Callable[[Params], str | None]  # the problem when violated, else None
    families: tuple[str, ...] = FAMILIES  # the model families (model.family) it applies to


RLAN_ONLY, TRM_ONLY = ("rlan",), ("trm",)


def applies(rule: Rule, p: Params) -> bool:
    return p.model.family in rule.families


@dataclass(frozen=True)
class Violation:
    rule: Rule
    message: str
    accepted: bool = False  # an error rule listed in validation.accept_broken_rules

    @property
    def severity(self) -> Status:
        return "accepted" if self.accepted else self.rule.severity

    def __str__(self) -> str:
        note = " (accepted in validation.accept_broken_rules)" if self.accepted else ""
        return f"[{self.severity}] {self.rule.id} ({', '.join(self.rule.keys)}): {self.message}{note}"


def _when(cond: bool, message: str) -> str | None:
    return message if cond else None


def _optimizer_steps_per_epoch(p: Params) -> int:
    if p.train.steps_per_epoch is not None:
        return p.train.steps_per_epoch
    n_train, n_eval = _TASKS_PER_SOURCE[p.data.source]
    if p.data.max_tasks is not None:
        n_train, n_eval = min(n_train, p.data.max_tasks), min(n_eval, p.data.max_tasks)
    samples = (n_train + n_eval) * p.augment.samples_per_task
    return max(1, samples // (p.train.batch_size * p.train.grad_accumulation_steps))


def _ema_lag(p: Params) -> str | None:
    horizon = 1.0 / (1.0 - p.train.ema_decay)
    between = _optimizer_steps_per_epoch(p) * p.train.eval_every
    return _when(
        horizon > between,
        f"EMA with decay {p.train.ema_decay} averages over ~{horizon:.0f} optimizer steps, more than "
        f"the ~{between} steps between two evaluations: the evaluated EMA weights lag the trained ones "
        "(docs/sources.md#ema-lag; the fixed configuration uses 0.99)",
    )


def _threshold_order(p: Params) -> str | None:
    m = p.monitoring
    pairs = [
        ("exact_match_gap", m.exact_match_gap_warning, m.exact_match_gap_critical),
        ("relative_gap", m.relative_gap_warning, m.relative_gap_critical),
        ("entropy_ratio", m.entropy_ratio_warning, m.entropy_ratio_critical),
        ("stop_value_gap", m.stop_value_gap_warning, m.stop_value_gap_critical),
        ("loss_ratio", m.loss_ratio_warning, m.loss_ratio_critical),
    ]
    bad = [f"monitoring.{n}_warning={w} > monitoring.{n}_critical={c}" for n, w, c in pairs if w > c]
    return "; ".join(bad) or None


ACCEPT_KEY = "validation.accept_broken_rules"
_ACCEPT_RULES = ("accepted-rules-known", "accepted-rules-broken")  # check the list; cannot be accepted


def acceptable() -> list[str]:
    """Ids of the error rules that `validation.accept_broken_rules` may list."""
    return [r.id for r in RULES if r.severity == "error" and r.id not in _ACCEPT_RULES]


def _unknown_accepted(p: Params) -> str | None:
    known = acceptable()
    bad = [i for i in p.validation.accept_broken_rules if i not in known]
    return _when(bool(bad), f"{ACCEPT_KEY} lists {shorten(', '.join(bad), 200)}, not an error rule that can be accepted "
                            f"(those are: {', '.join(known)})")


def _accepted_not_broken(p: Params) -> str | None:
    rules = {r.id: r for r in RULES}
    idle = [i for i in p.validation.accept_broken_rules if i in acceptable() and rules[i].check(p) is None]
    return _when(bool(idle), f"{ACCEPT_KEY} lists {', '.join(idle)}, which this configuration does not break: "
                             "remove it, so that a later breach is an error again")


RULES: tuple[Rule, ...] = (
    Rule(
        "hyperlora-init-scale-negligible", "error", ("model.hyperlora_init_scale",),
        "HyperLoRA's first deltas are large enough to give a meta-learning signal (init scale > 0.01)",
        "docs/sources.md#hyperlora",
        lambda p: _when(
            p.model.use_hyperlora and p.model.hyperlora_init_scale <= 0.01,
            f"model.hyperlora_init_scale={p.model.hyperlora_init_scale}: at 0.01 the adaptation effect was "
            f"a 0.0001 loss delta (negligible); the model's default is {HYPERLORA_CODE_DEFAULTS['init_scale']}",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "hyperlora-init-scale-default", "warning", ("model.hyperlora_init_scale",),
        "HyperLoRA init scale agrees with the model's default",
        "docs/sources.md#hyperlora",
        lambda p: _when(
            p.model.use_hyperlora and p.model.hyperlora_init_scale != HYPERLORA_CODE_DEFAULTS["init_scale"],
            f"model.hyperlora_init_scale={p.model.hyperlora_init_scale} differs from the model's default "
            f"{HYPERLORA_CODE_DEFAULTS['init_scale']} (the validated value)",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "hyperlora-scaling-default", "warning", ("model.hyperlora_scaling",),
        "HyperLoRA scaling agrees with the model's default, or LoRA magnitudes are watched",
        "docs/sources.md#hyperlora",
        lambda p: _when(
            p.model.use_hyperlora and p.model.hyperlora_scaling != HYPERLORA_CODE_DEFAULTS["scaling"],
            f"model.hyperlora_scaling={p.model.hyperlora_scaling} is {p.model.hyperlora_scaling / HYPERLORA_CODE_DEFAULTS['scaling']:g}x "
            f"the model's default {HYPERLORA_CODE_DEFAULTS['scaling']}: watch lora_magnitude_* for explosions",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "train-last-step", "error", ("train.use_best_step_selection",),
        "training takes the last solver step (best-step selection only at inference)",
        "docs/sources.md#last-step-in-training",
        lambda p: _when(
            p.train.use_best_step_selection,
            "train.use_best_step_selection must be false: entropy-based selection adds noise to the "
            "gradients; use evaluate.use_best_step_selection at inference instead",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "loo-min-pairs", "error", ("train.loo_training.min_pairs_for_loo",),
        "leave-one-out needs at least 2 pairs (one held out, one left as context)",
        "docs/sources.md#leave-one-out",
        lambda p: _when(
            p.train.loo_training.enabled and p.train.loo_training.min_pairs_for_loo < 2,
            f"train.loo_training.min_pairs_for_loo={p.train.loo_training.min_pairs_for_loo}: holding one "
            "pair out of fewer than 2 leaves no context",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "loo-every-pair", "warning", ("train.loo_training.max_holdouts",),
        "leave-one-out holds every context pair out in turn, as the validated code",
        "docs/sources.md#leave-one-out",
        lambda p: _when(
            p.train.loo_training.enabled and p.train.loo_training.max_holdouts is not None,
            f"train.loo_training.max_holdouts={p.train.loo_training.max_holdouts}: at most that many pairs per sample "
            "are held out per step, a cheaper experiment than the validated one (null: every pair)",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "equivariance-needs-hyperlora", "error",
        ("train.equivariance_training.enabled", "model.use_hyperlora"),
        "the equivariance loss compares HyperLoRA deltas, so HyperLoRA must be on",
        "docs/sources.md#equivariance",
        lambda p: _when(
            p.train.equivariance_training.enabled and not p.model.use_hyperlora,
            "train.equivariance_training.enabled is true but model.use_hyperlora is false: there are no "
            "LoRA deltas to compare",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "color-permutation-inverse-aug", "error",
        ("augment.color_permutation_prob", "evaluate.use_inverse_aug"),
        "a model trained on recoloured versions is evaluated with inverse augmentation",
        "docs/sources.md#augmentation-and-inverse-augmentation",
        lambda p: _when(
            p.augment.color_permutation_prob > 0 and not p.evaluate.use_inverse_aug,
            f"augment.color_permutation_prob={p.augment.color_permutation_prob} requires "
            "evaluate.use_inverse_aug: true (predictions must be mapped back before comparison)",
        ),
    ),
    Rule(
        "eval-views-inverse-aug", "error",
        ("evaluate.num_augmented_views", "evaluate.num_color_perms", "evaluate.use_inverse_aug"),
        "augmented evaluation views are mapped back before comparison",
        "docs/sources.md#inverse-augmentation-and-voting",
        lambda p: _when(
            (p.evaluate.num_augmented_views > 1 or p.evaluate.num_color_perms > 1)
            and not p.evaluate.use_inverse_aug,
            f"{p.evaluate.num_augmented_views} dihedral x {p.evaluate.num_color_perms} colour views without "
            "evaluate.use_inverse_aug compares predictions in augmented space with the original answer",
        ),
    ),
    Rule(
        "eval-dihedral-group", "warning", ("evaluate.num_augmented_views",),
        "8 augmented views means the whole dihedral group; fewer take the first k transforms",
        "docs/sources.md#evaluation-views",
        lambda p: _when(
            1 < p.evaluate.num_augmented_views < 8,
            f"evaluate.num_augmented_views={p.evaluate.num_augmented_views} uses dihedral ids "
            f"0..{p.evaluate.num_augmented_views - 1} only, not the whole group (8)",
        ),
    ),
    Rule(
        "eval-dihedral-trained", "warning", ("evaluate.num_augmented_views", "augment.dihedral"),
        "dihedral evaluation views are views the model was trained on",
        "docs/sources.md#inverse-augmentation-and-voting",
        lambda p: _when(
            p.evaluate.num_augmented_views > 1 and not p.augment.dihedral,
            "evaluation uses dihedral views but augment.dihedral is false: the model never saw them",
        ),
    ),
    Rule(
        "eval-voting-views", "warning", ("evaluate.use_voting",),
        "voting has more than one view to pool",
        "docs/sources.md#inverse-augmentation-and-voting",
        lambda p: _when(
            p.evaluate.use_voting and p.evaluate.num_augmented_views * p.evaluate.num_color_perms == 1,
            "evaluate.use_voting with a single view pools nothing",
        ),
    ),
    Rule(
        "eval-trm-style", "warning", ("evaluate.use_trm_style_eval",),
        "views and voting apply only with TRM-style evaluation",
        "docs/sources.md#evaluation-views",
        lambda p: _when(
            not p.evaluate.use_trm_style_eval
            and p.evaluate.num_augmented_views * p.evaluate.num_color_perms > 1,
            "evaluate.use_trm_style_eval is false: only the identity view is evaluated and "
            "num_augmented_views / num_color_perms are ignored",
        ),
    ),
    Rule(
        "fixed-constant-temperature", "error",
        ("model.use_gumbel_softmax", "train.temperature_start", "train.temperature_end"),
        "without Gumbel noise the temperature is constant (train like eval)",
        "docs/sources.md#the-fixed-configuration",
        lambda p: _when(
            not p.model.use_gumbel_softmax and p.train.temperature_start != p.train.temperature_end,
            f"model.use_gumbel_softmax is false but the temperature decays {p.train.temperature_start} -> "
            f"{p.train.temperature_end}: set train.temperature_start == train.temperature_end",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "gumbel-entropy-raw", "warning", ("model.use_gumbel_softmax", "train.entropy_on_raw_logits"),
        "with Gumbel noise the attention entropy is measured on the raw softmax",
        "docs/sources.md#entropy-after-the-noise",
        lambda p: _when(
            p.model.use_gumbel_softmax and not p.train.entropy_on_raw_logits,
            "train.entropy_on_raw_logits is false with Gumbel noise on: the entropy term measures the noise "
            "(train entropy 0.02 against 3.82 in evaluation)",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "kl-needs-gumbel", "warning", ("train.lambda_kl_consistency", "model.use_gumbel_softmax"),
        "the noisy-versus-clean KL term has noise to act on",
        "docs/sources.md#kl-consistency",
        lambda p: _when(
            p.train.lambda_kl_consistency > 0 and not p.model.use_gumbel_softmax,
            f"train.lambda_kl_consistency={p.train.lambda_kl_consistency} has no effect without Gumbel noise "
            "(noisy and clean attention are equal)",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "temperature-decays", "warning", ("train.temperature_start", "train.temperature_end"),
        "the temperature does not grow during training",
        "docs/sources.md#temperature-decay",
        lambda p: _when(
            p.train.temperature_end > p.train.temperature_start,
            f"train.temperature_end={p.train.temperature_end} > temperature_start={p.train.temperature_start}",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "ema-lag", "warning", ("train.ema_decay", "train.eval_every"),
        "the EMA weights that are evaluated are not far behind the trained weights",
        "docs/sources.md#ema-lag",
        _ema_lag,
        families=RLAN_ONLY,
    ),
    Rule(
        "meta-learning-starts", "warning", ("train.meta_learning_start_epoch", "train.epochs"),
        "LOO and equivariance losses start before training ends",
        "docs/sources.md#leave-one-out",
        lambda p: _when(
            (p.train.loo_training.enabled or p.train.equivariance_training.enabled)
            and p.train.meta_learning_start_epoch >= p.train.epochs,
            f"train.meta_learning_start_epoch={p.train.meta_learning_start_epoch} >= train.epochs="
            f"{p.train.epochs}: the meta-learning losses never run",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "distributed-accumulation", "error",
        ("train.grad_accumulation_steps", "train.nproc_per_node", "train.nnodes"),
        "the micro-batches of an optimizer step divide evenly over the processes",
        "docs/distributed.md#batch-rule",
        lambda p: _when(
            p.train.grad_accumulation_steps % (p.train.nnodes * p.train.nproc_per_node) != 0,
            f"train.grad_accumulation_steps={p.train.grad_accumulation_steps} is not a multiple of the "
            f"{p.train.nnodes * p.train.nproc_per_node} processes: each process runs grad_accumulation_steps / "
            "world size micro-batches of batch_size, so that the effective batch stays batch_size x "
            "grad_accumulation_steps",
        ),
    ),
    Rule(
        id="context-heads-divide-hidden", severity="error", keys=("model.solver_context_heads", "model.hidden_dim"),
        summary="the context cross-attention heads split the hidden channels evenly",
        source="the model (pipeline/model/rlan/layers.py CrossAttention2d)",
        check=lambda p: _when(
            (p.model.use_cross_attention_context or p.model.use_solver_context)
            and p.model.hidden_dim % p.model.solver_context_heads != 0,
            f"model.solver_context_heads={p.model.solver_context_heads} does not divide model.hidden_dim="
            f"{p.model.hidden_dim}: the context cross-attention (use_cross_attention_context, use_solver_context) "
            "gives each head hidden_dim / solver_context_heads channels",
        ),
        families=RLAN_ONLY,
    ),
    Rule(
        "trm-heads-divide-hidden", "error", ("trm.num_heads", "trm.hidden_size", "trm.mixer"),
        "TRM's attention heads split the hidden channels evenly, into an even number each (RoPE turns pairs)",
        "the model (pipeline/model/trm/layers.py Attention)",
        lambda p: _when(
            p.trm.mixer == "attention" and (p.trm.hidden_size % p.trm.num_heads or (p.trm.hidden_size // p.trm.num_heads) % 2),
            f"trm.hidden_size={p.trm.hidden_size} is not {p.trm.num_heads} heads (trm.num_heads) of an even number "
            "of channels",
        ),
        families=TRM_ONLY,
    ),
    Rule(
        "trm-batch-accumulation", "error", ("trm.global_batch_size", "train.grad_accumulation_steps"),
        "TRM's examples per optimizer step split evenly into the micro-batches of a step",
        "the training loop (pipeline/model/trm/family.py)",
        lambda p: _when(
            p.trm.global_batch_size % p.train.grad_accumulation_steps != 0,
            f"trm.global_batch_size={p.trm.global_batch_size} is not a multiple of train.grad_accumulation_steps="
            f"{p.train.grad_accumulation_steps}: each micro-batch holds global_batch_size / grad_accumulation_steps "
            "examples",
        ),
        families=TRM_ONLY,
    ),
    Rule(
        "trm-cache-views", "warning", ("evaluate.views", "model.family"),
        "TRM is evaluated on the cached versions, the only ones with a trained puzzle embedding",
        "docs/sources.md#trm (TRM's own evaluation votes over the cached versions)",
        lambda p: _when(
            p.evaluate.views != "cache",
            "evaluate.views=fresh with model.family=trm: a fresh view has no puzzle embedding of its own, so TRM "
            "answers it with the blank one (evaluate.views: cache is TRM's own evaluation)",
        ),
        families=TRM_ONLY,
    ),
    Rule(
        "monitoring-threshold-order", "error",
        ("monitoring.*_warning", "monitoring.*_critical"),
        "each warning threshold is at most its critical threshold",
        "docs/sources.md#gap-monitoring",
        _threshold_order,
    ),
    Rule(
        "accepted-rules-known", "error", (ACCEPT_KEY,),
        "every rule accepted as broken is an error rule of this list",
        "docs/configuration.md#breaking-a-rule-on-purpose",
        _unknown_accepted,
    ),
    Rule(
        "accepted-rules-broken", "warning", (ACCEPT_KEY,),
        "every rule accepted as broken is broken by this configuration",
        "docs/configuration.md#breaking-a-rule-on-purpose",
        _accepted_not_broken,
    ),
)
_ORDER = {"error": 0, "accepted": 1, "warning": 2}


def check_rules(params: Params, rules: tuple[Rule, ...] = RULES) -> list[Violation]:
    """Every violated rule with its message, errors first, then accepted errors, then warnings, in rule
    order; an error rule listed in `validation.accept_broken_rules` is accepted."""
    accept = set(params.validation.accept_broken_rules) - set(_ACCEPT_RULES)
    found = [Violation(r, msg, accepted=r.severity == "error" and r.id in accept)
             for r in rules if applies(r, params) and (msg := r.check(params)) is not None]
    return sorted(found, key=lambda v: _ORDER[v.severity])


def summary(violations: list[Violation], rules: tuple[Rule, ...] = RULES,
            family: str | None = None) -> dict[str, int]:
    """Counts for metrics/params_validation.json: numbers only, as DVC's metrics views need (the
    accepted rules' ids are in the report and on the MLflow run). With `family`, only the rules of
    that model family count as checked."""
    count = {s: sum(v.severity == s for v in violations) for s in _ORDER}
    checked = [r for r in rules if family is None or family in r.families]
    return {"errors": count["error"], "warnings": count["warning"], "accepted_errors": count["accepted"],
            "rules_checked": len(checked), "rules_passed": len(checked) - len(violations)}


def render_report(violations: list[Violation], rules: tuple[Rule, ...] = RULES, family: str | None = None,
                  preface: str = "") -> str:
    """Markdown report: `preface` (a paragraph), the verdict, the violations, then every rule with its
    status (`n/a` for a rule of another model family than `family`)."""
    s = summary(violations, rules, family)
    verdict = "FAILED" if s["errors"] else "passed"
    by_id = {v.rule.id: v for v in violations}
    lines = [
        "# params.yaml validation",
        "",
        *([preface, ""] if preface else []),
        f"**{verdict}**: {s['errors']} error(s), {s['accepted_errors']} accepted error(s), {s['warnings']} "
        f"warning(s), {s['rules_passed']} of {s['rules_checked']} rules passed.",
        "",
    ]
    if s["accepted_errors"]:
        accepted = [v.rule.id for v in violations if v.accepted]
        lines += [f"Broken on purpose (`{ACCEPT_KEY}`): {', '.join(f'`{i}`' for i in accepted)}. "
                  "Its results show what breaking them does; they are not a valid run of the pipeline.", ""]
    if violations:
        lines += ["## Problems", ""]
        lines += [f"- **{v.severity}** `{v.rule.id}`: {v.message}" for v in violations]
        lines.append("")
    lines += ["## Rules", "", "| id | severity | keys | rule | source | status |", "|---|---|---|---|---|---|"]
    for r in rules:
        status = (by_id[r.id].severity.upper() if r.id in by_id else
                  "ok" if family is None or family in r.families else f"n/a ({', '.join(r.families)} only)")
        keys = ", ".join(f"`{k}`" for k in r.keys)
        lines.append(f"| `{r.id}` | {r.severity} | {keys} | {r.summary} | {r.source} | {status} |")
    return "\n".join(lines) + "\n"
