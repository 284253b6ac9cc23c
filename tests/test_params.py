"""The params.yaml schema: the committed file loads; bad keys, types and ranges are named."""

from __future__ import annotations

import math

import pytest

from pipeline.params import ParamsError, load_params, parse_params
from tests.helpers import REPO, raw_params, set_key


def _error(raw) -> ParamsError:
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    return exc.value


def test_committed_params_load_with_stable_values():
    p = load_params(REPO / "params.yaml")
    assert p.model.hyperlora_init_scale == 0.1
    assert p.train.loo_training.loss_weight == 0.5
    assert p.train.equivariance_training.loss_weight == 0.1
    assert p.evaluate.num_augmented_views * p.evaluate.num_color_perms == 32
    assert p.augment.samples_per_task == 500
    assert p.flat()["train.loo_training.min_pairs_for_loo"] == 2


def test_params_are_frozen():
    p = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):
        p.model.hidden_dim = 3  # type: ignore[misc]


@pytest.mark.parametrize("key", ["model.hiden_dim", "train.loo_training.weight", "nonsense"])
def test_unknown_key_is_named_with_known_keys(key):
    raw = raw_params()
    if "." in key:
        set_key(raw, key, 1)
    else:
        raw[key] = {}
    err = _error(raw)
    assert any(line.startswith(f"{key}: unknown key") for line in err.problems), err.problems
    assert "known keys here" in str(err)

    hint = {"model.hiden_dim": "model.hidden_dim", "train.loo_training.weight": "train.loo_training.loss_weight"}
    assert (f"(did you mean {hint[key]}?)" in str(err)) if key in hint else "did you mean" not in str(err)


def test_override_of_an_unknown_key_names_the_closest():
    from pipeline.params import load_params

    with pytest.raises(ParamsError, match=r"model.hyperlora_int_scale: unknown key \(did you mean "
                                          r"model.hyperlora_init_scale\?\)"):
        load_params(REPO / "params.yaml").override({"model.hyperlora_int_scale": 0.05})


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("model.hyperlora_rank", 0, ">= 1"),
        ("model.dropout", 1.0, "< 1.0"),
        ("augment.color_permutation_prob", 1.5, "<= 1.0"),
        ("evaluate.num_augmented_views", 9, "<= 8"),
        ("train.ema_decay", -0.1, ">= 0.0"),
    ],
)
def test_out_of_range_names_key_and_allowed_range(key, value, fragment):
    err = _error(set_key(raw_params(), key, value))
    line = next(p for p in err.problems if p.startswith(key + ":"))
    assert fragment in line and repr(value) in line


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.hidden_dim", 256.0),  # float for int
        ("model.hidden_dim", "256"),  # string for int
        ("model.use_hyperlora", 1),  # int for bool
        ("train.learning_rate", "5e-4"),  # string for float
        ("data.source", "arc-agi-3"),  # not one of the choices
        ("train.device", "tpu"),
    ],
)
def test_wrong_type_names_key(key, value):
    err = _error(set_key(raw_params(), key, value))
    assert any(p.startswith(key + ":") for p in err.problems), err.problems


def test_missing_key_is_named():
    raw = raw_params()
    del raw["train"]["ema_decay"]
    assert "train.ema_decay: missing" in str(_error(raw))


def test_non_finite_rejected():
    err = _error(set_key(raw_params(), "train.learning_rate", math.nan))
    assert "train.learning_rate: must be a finite number" in err.problems


def test_pass_ks_must_increase():
    err = _error(set_key(raw_params(), "evaluate.pass_ks", [2, 1]))
    assert any(p.startswith("evaluate.pass_ks:") for p in err.problems)


def test_not_a_mapping():
    assert "top level must be a mapping" in str(_error([1, 2]))


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(f)


def test_accepted_rules_are_a_typed_frozen_list():
    p = parse_params(set_key(raw_params(), "validation.accept_broken_rules", ["fixed-constant-temperature"]))
    assert p.validation.accept_broken_rules == ("fixed-constant-temperature",)
    assert load_params(REPO / "params.yaml").validation.accept_broken_rules == ()
    err = _error(set_key(raw_params(), "validation.accept_broken_rules", "fixed-constant-temperature"))
    assert any(line.startswith("validation.accept_broken_rules:") for line in err.problems), err.problems
    err = _error(set_key(raw_params(), "validation.accept_broken_rules", [1]))
    assert any(line.startswith("validation.accept_broken_rules") for line in err.problems), err.problems
