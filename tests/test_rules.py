"""The seed's validation rules and the validate_params stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.params import Params
from pipeline.rules import RULES, check_rules, render_report, summary
from tests.helpers import REPO, params_with, tool_env, write_params

FIXED = dict(model__use_gumbel_softmax=False, model__task_conditioned_clues=True, train__temperature_start=0.5,
             train__temperature_end=0.5, train__entropy_on_raw_logits=True, train__lambda_kl_consistency=0.1,
             train__eval_every=1, train__ema_decay=0.99)


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
    # the seed flags hyperlora_scaling 1.0 (10x the code default); seed 004 flags post-noise entropy
    assert ids(p, "warning") == {"hyperlora-scaling-default", "gumbel-entropy-raw"}


def test_fixed_configuration_has_no_errors():
    p = params_with(**FIXED)
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
        (dict(augment__track_augmentation=False), "augmentation-tracked"),
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


def _stage(tmp_path, **overrides) -> tuple[subprocess.CompletedProcess, dict]:
    write_params(tmp_path, **overrides)
    out = {k: tmp_path / f for k, f in (("metrics", "v.json"), ("report", "v.md"), ("stamp", "ok"))}
    cmd = [sys.executable, "-m", "stages.validate_params", "--params", str(tmp_path / "params.yaml")]
    cmd += [a for k, f in out.items() for a in (f"--{k}", str(f))]
    return subprocess.run(cmd, cwd=REPO, env=tool_env(), capture_output=True, text=True), out


def test_stage_passes_stable_and_writes_outputs(tmp_path):
    proc, out = _stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out["metrics"].read_text()) == {"errors": 0, "warnings": 2, "rules_checked": len(RULES),
                                                      "rules_passed": len(RULES) - 2, "schema_errors": 0}
    assert out["stamp"].exists() and "passed" in out["report"].read_text()


def test_stage_fails_on_rule_error_naming_the_key(tmp_path):
    proc, out = _stage(tmp_path, model__hyperlora_init_scale=0.01)
    assert proc.returncode != 0
    assert "model.hyperlora_init_scale" in proc.stderr
    assert not out["stamp"].exists()
    assert json.loads(out["metrics"].read_text())["errors"] == 1


def test_stage_fails_on_schema_error_naming_the_key(tmp_path):
    proc, out = _stage(tmp_path, model__hyperlora_rank=-3)
    assert proc.returncode != 0
    assert "model.hyperlora_rank" in proc.stderr and ">= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out["stamp"].exists()
