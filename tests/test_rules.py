"""The validation rules (docs/configuration.md) and the validate_params stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.experiments.committed import yaml_value
from pipeline.experiments.runner import FIXED
from pipeline.params import Params
from pipeline.rules import RULES, acceptable, check_rules, render_report, summary
from tests.helpers import REPO, params_with, run, tool_env, write_params


def ids(p: Params, severity: str | None = None) -> set[str]:
    return {v.rule.id for v in check_rules(p) if severity is None or v.severity == severity}


def test_rule_ids_unique_and_keys_exist():
    assert len({r.id for r in RULES}) == len(RULES)
    flat = params_with().flat()
    for r in RULES:
        assert r.severity in ("error", "warning")
        for key in r.keys:
            if "*" not in key:
                assert key in flat, f"rule {r.id} names unknown key {key}"


def test_stable_configuration_has_no_errors_and_the_known_warnings():
    p = params_with()
    assert ids(p, "error") == set()
    # the validation report flags hyperlora_scaling 1.0 (10x the code default); the gap analysis flags post-noise entropy
    assert ids(p, "warning") == {"hyperlora-scaling-default", "gumbel-entropy-raw"}


def test_trm_is_checked_by_its_own_rules_and_the_shared_ones():
    trm = params_with(model__family="trm", evaluate__views="cache")
    assert ids(trm) == set()  # TRM's ARC-AGI-1 configuration passes; RLAN's warnings are not TRM's
    assert ids(params_with(model__family="trm", model__hyperlora_init_scale=0.01, evaluate__views="cache")) == set()
    assert ids(params_with(model__family="trm"), "warning") == {"trm-cache-views"}  # fresh views: the blank embedding
    assert ids(params_with(model__family="trm", evaluate__views="cache", trm__num_heads=3), "error") == {
        "trm-heads-divide-hidden"}
    assert ids(params_with(model__family="trm", evaluate__views="cache", trm__hidden_size=24, trm__num_heads=8),
               "error") == {"trm-heads-divide-hidden"}  # 3 channels per head: RoPE turns pairs
    assert ids(params_with(model__family="trm", evaluate__views="cache", trm__mixer="mlp", trm__num_heads=3)) == set()
    assert ids(params_with(model__family="trm", evaluate__views="cache", trm__global_batch_size=766),
               "error") == {"trm-batch-accumulation"}
    assert ids(params_with(model__family="trm", evaluate__views="cache", evaluate__use_inverse_aug=False),
               "error") == {"color-permutation-inverse-aug", "eval-views-inverse-aug"}  # shared rules: both families
    assert "trm-heads-divide-hidden" not in ids(params_with(trm__num_heads=3))  # RLAN does not read section trm


def test_fixed_configuration_has_no_errors():
    p = params_with().override(FIXED)
    assert ids(p, "error") == set()
    # KL consistency acts on Gumbel noise, which the fixed configuration turns off
    assert "kl-needs-gumbel" in ids(p, "warning")
    assert "gumbel-entropy-raw" not in ids(p)


@pytest.mark.parametrize(
    "overrides, rule",
    [
        (dict(model__hyperlora_init_scale=0.01), "hyperlora-init-scale-negligible"),
        (dict(train__use_best_step_selection=True), "train-last-step"),
        (dict(train__loo_training__min_pairs_for_loo=1), "loo-min-pairs"),
        (dict(evaluate__use_inverse_aug=False), "color-permutation-inverse-aug"),
        (dict(evaluate__use_inverse_aug=False, augment__color_permutation_prob=0.0), "eval-views-inverse-aug"),
        (dict(model__use_gumbel_softmax=False), "fixed-constant-temperature"),
        (dict(model__use_hyperlora=False), "equivariance-needs-hyperlora"),
        (dict(monitoring__entropy_ratio_warning=6.0), "monitoring-threshold-order"),
    ],
)
def test_error_rules(overrides, rule):
    assert rule in ids(params_with(**overrides), "error")


@pytest.mark.parametrize(
    "overrides, rule",
    [
        (dict(model__hyperlora_init_scale=0.05), "hyperlora-init-scale-default"),
        (dict(evaluate__num_augmented_views=4), "eval-dihedral-group"),
        (dict(augment__dihedral=False), "eval-dihedral-trained"),
        (dict(evaluate__num_augmented_views=1, evaluate__num_color_perms=1), "eval-voting-views"),
        (dict(evaluate__use_trm_style_eval=False), "eval-trm-style"),
        (dict(train__temperature_end=2.0), "temperature-decays"),
        (dict(train__steps_per_epoch=10, train__eval_every=1), "ema-lag"),
        (dict(train__meta_learning_start_epoch=500), "meta-learning-starts"),
        (dict(train__loo_training__max_holdouts=1), "loo-every-pair"),
    ],
)
def test_warning_rules(overrides, rule):
    p = params_with(**overrides)
    assert rule in ids(p, "warning")
    assert rule not in ids(params_with(), "warning")


def test_init_scale_equal_to_default_passes_and_other_values_warn_only():
    assert not ids(params_with(model__hyperlora_init_scale=0.1)) & {"hyperlora-init-scale-default",
                                                                 "hyperlora-init-scale-negligible"}
    assert ids(params_with(model__hyperlora_init_scale=0.2), "error") == set()


def test_rules_off_when_their_feature_is_off():
    p = params_with(model__use_hyperlora=False, train__equivariance_training__enabled=False,
                    model__hyperlora_init_scale=0.001)
    assert "hyperlora-init-scale-negligible" not in ids(p)
    p = params_with(train__loo_training__enabled=False, train__loo_training__min_pairs_for_loo=1)
    assert "loo-min-pairs" not in ids(p)


def test_report_lists_every_rule_and_the_counts():
    violations = check_rules(params_with(model__hyperlora_init_scale=0.01))
    text = render_report(violations)
    assert "**FAILED**" in text
    for r in RULES:
        assert f"`{r.id}`" in text
    assert summary(violations)["errors"] == 1


NO_CPU_LIMIT = {"train__max_cpu_hours": 1.0e12}


def _stage(tmp_path, **overrides) -> tuple[subprocess.CompletedProcess, dict]:
    """The stage on the committed configuration plus `overrides`, with no limit on a CPU run's hours,
    so that the early refusal of a run this CPU cannot finish does not apply (tests/test_early_refusal.py
    tests it): these tests are about the rules."""
    write_params(tmp_path, **{**NO_CPU_LIMIT, **overrides})
    out = {k: tmp_path / f for k, f in (("metrics", "v.json"), ("report", "v.md"), ("stamp", "ok"))}
    cmd = [sys.executable, "-m", "stages.validate_params", "--params", str(tmp_path / "params.yaml")]
    cmd += [a for k, f in out.items() for a in (f"--{k}", str(f))]
    return subprocess.run(cmd, cwd=REPO, env=tool_env(), capture_output=True, text=True), out


@pytest.mark.slow
def test_stage_passes_stable_and_writes_outputs(tmp_path):
    proc, out = _stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    rlan = [r for r in RULES if "rlan" in r.families]  # TRM's rules do not apply
    assert 0 < len(rlan) < len(RULES)
    assert json.loads(out["metrics"].read_text()) == {"errors": 0, "warnings": 2, "accepted_errors": 0,
                                                      "rules_checked": len(rlan), "rules_passed": len(rlan) - 2,
                                                      "schema_errors": 0, "keys_differing_from_head": 0}
    report = out["report"].read_text()
    assert out["stamp"].exists() and "passed" in report and "| n/a (trm only) |" in report


@pytest.mark.slow
def test_stage_fails_on_rule_error_naming_the_key(tmp_path):
    proc, out = _stage(tmp_path, model__hyperlora_init_scale=0.01)
    assert proc.returncode != 0
    assert "model.hyperlora_init_scale" in proc.stderr
    assert not out["stamp"].exists()
    assert json.loads(out["metrics"].read_text())["errors"] == 1


@pytest.mark.slow
def test_stage_fails_on_schema_error_naming_the_key(tmp_path):
    proc, out = _stage(tmp_path, model__hyperlora_rank=-3)
    assert proc.returncode != 0
    assert "model.hyperlora_rank" in proc.stderr and ">= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out["stamp"].exists()


# --- rules broken on purpose: validation.accept_broken_rules ------------------------------------

NO_GUMBEL = dict(model__use_gumbel_softmax=False)  # with stable's decaying temperature: an error


def test_an_accepted_error_is_a_recorded_warning_not_a_pass():
    p = params_with(**NO_GUMBEL, validation__accept_broken_rules=["fixed-constant-temperature"])
    found = check_rules(p)
    [v] = [v for v in found if v.rule.id == "fixed-constant-temperature"]
    assert v.accepted and v.severity == "accepted" and "accepted" in str(v)
    s = summary(found)
    assert (s["errors"], s["accepted_errors"]) == (0, 1)
    assert s["warnings"] == len(ids(params_with(**NO_GUMBEL), "warning"))  # counted apart from the warnings
    text = render_report(found)
    assert "**passed**: 0 error(s), 1 accepted error(s)" in text and "| ACCEPTED |" in text
    assert "Broken on purpose (`validation.accept_broken_rules`): `fixed-constant-temperature`." in text
    assert ids(params_with(**NO_GUMBEL), "error") == {"fixed-constant-temperature"}  # not accepted: an error


def test_accepting_an_unknown_or_warning_rule_is_an_error_naming_it():
    p = params_with(validation__accept_broken_rules=["no-such-rule", "hyperlora-scaling-default"])
    [v] = [v for v in check_rules(p) if v.severity == "error"]
    assert v.rule.id == "accepted-rules-known"
    assert "no-such-rule" in v.message and "hyperlora-scaling-default" in v.message
    assert "accepted-rules-known" not in acceptable()  # the list's own checks cannot be accepted
    p = params_with(validation__accept_broken_rules=["accepted-rules-known", "no-such-rule"])
    assert "accepted-rules-known" in ids(p, "error")


def test_accepting_a_rule_that_holds_is_a_warning():
    p = params_with(validation__accept_broken_rules=["fixed-constant-temperature"])
    assert ids(p, "error") == set()
    [v] = [v for v in check_rules(p) if v.rule.id == "accepted-rules-broken"]
    assert v.severity == "warning" and "fixed-constant-temperature" in v.message


@pytest.mark.slow
def test_stage_records_accepted_errors(tmp_path):
    proc, out = _stage(tmp_path, **NO_GUMBEL, validation__accept_broken_rules=["fixed-constant-temperature"])
    assert proc.returncode == 0, proc.stderr
    m = json.loads(out["metrics"].read_text())
    assert (m["errors"], m["accepted_errors"]) == (0, 1)
    assert all(isinstance(v, int) for v in m.values())  # DVC's metrics views: numbers only
    assert "Broken on purpose (`validation.accept_broken_rules`): `fixed-constant-temperature`." in \
        out["report"].read_text()
    assert "WARNING" in proc.stderr and "[accepted] fixed-constant-temperature" in proc.stderr
    assert out["stamp"].exists() and "ACCEPTED" in out["report"].read_text()


@pytest.mark.slow
def test_training_run_is_tagged_with_the_accepted_rules(tmp_path):
    from pipeline.tracking import Tracker

    p = params_with(**NO_GUMBEL, validation__accept_broken_rules=["fixed-constant-temperature"],
                    tracking__tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = Tracker(p)
    tracker.start()
    tags = tracker._client.get_run(tracker.run_id).data.tags
    tracker.end()
    assert tags["validation.accepted_rules"] == "fixed-constant-temperature"


@pytest.mark.slow
@pytest.mark.parametrize("key, value, fragment", [("model.hyperlora_rank", 0, ">= 1"),
                                                  ("model.hyperlora_init_scale", 0.01, "breaks 1 rule")])
def test_stage_error_names_the_override_left_in_params_yaml(tmp_path, key, value, fragment):
    """A failed `dvc exp run -S` leaves its override in params.yaml: the error says so and how to restore."""
    write_params(tmp_path, **NO_CPU_LIMIT)  # the baseline as the stage runs it
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "baseline"]):
        run(cmd, tmp_path)
    committed = params_with().flat()[key]
    proc, out = _stage(tmp_path, **{key.replace(".", "__"): value})
    assert proc.returncode != 0 and fragment in proc.stderr
    assert f"{key}: committed {committed!r}, now {value!r}" in proc.stderr
    assert "git checkout -- params.yaml" in proc.stderr and "Traceback" not in proc.stderr
    assert not out["stamp"].exists()
    # said first, before any check, and recorded
    first = proc.stderr.splitlines()[0]
    assert first.endswith(f"this run differs from HEAD in: {key} ({committed!r} -> {value!r})")
    m = json.loads(out["metrics"].read_text())
    assert m["keys_differing_from_head"] == 1 and all(isinstance(v, int) for v in m.values())
    assert f"Differs from HEAD: `{key}={yaml_value(value)}`." in out["report"].read_text()
    if "rule" in fragment:  # how to break it on purpose
        assert "hyperlora-init-scale-negligible" in proc.stderr and "validation.accept_broken_rules" in proc.stderr


@pytest.mark.slow
def test_stage_says_when_the_run_is_heads_params(tmp_path):
    write_params(tmp_path, **NO_CPU_LIMIT)  # the baseline as the stage runs it
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "baseline"]):
        run(cmd, tmp_path)
    proc, out = _stage(tmp_path)
    assert proc.returncode == 0 and "this run's params.yaml is HEAD's" in proc.stderr.splitlines()[0]
    assert json.loads(out["metrics"].read_text())["keys_differing_from_head"] == 0
    assert "Differs from HEAD: nothing." in out["report"].read_text()
