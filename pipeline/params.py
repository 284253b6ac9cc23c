"""Typed schema of params.yaml.

Each section of params.yaml loads into a frozen pydantic model that rejects unknown keys, wrong
types and out-of-range values. `load_params` turns pydantic's errors into one `ParamsError` whose
lines name the dotted key, what was wrong and what is allowed. Cross-key checks (the validated configuration's
validation rules) live in `pipeline.rules`, not here: this module only knows single values.

The file is read defensively (`read_yaml`, every reader of a params file uses it): at most
`MAX_PARAMS_BYTES`, UTF-8, no YAML aliases (a few nested aliases expand to gigabytes), no key twice
in a mapping (YAML's last-wins would hide the first), at most `MAX_DEPTH` levels of nesting (a list
nested 10,000 deep would exhaust Python's recursion in every reader), YAML's safe types only. A value echoed in a message is cut to its first
`CLIP` characters and its length (`clip`).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from yaml.constructor import ConstructorError

# Defaults of the model code itself (not of params.yaml): the validation rules compare the
# configured values with these, as the validation report does (docs/sources.md) ("the code's HyperLoRAConfig uses
# scaling 0.1"; "RLANConfig default hyperlora_init_scale 0.1").
HYPERLORA_CODE_DEFAULTS = {"init_scale": 0.1, "scaling": 0.1}
MAX_PARAMS_BYTES = 1 << 20  # params.yaml is a few KB; a larger file is refused before it is parsed
MAX_DEPTH = 32  # levels of nesting a params file may have (params.yaml has 3); deeper is refused while parsing
CLIP = 80  # characters of a value shown in a message


def shorten(text: str, limit: int = CLIP) -> str:
    """`text`, or its first `limit` characters and its length when it is longer."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def clip(value: Any) -> str:
    """A value as a message shows it: its repr, cut (`shorten`)."""
    return shorten(repr(value))


# Every random choice of the pipeline follows one of these: the augmentation cache, the training
# (initialisation, sample order, held-out slice, each micro-batch's noise and dropout) and the
# evaluation's colour permutations. A run's seed is all three set to one value.
SEED_KEYS = ("augment.seed", "train.seed", "evaluate.seed")


class ParamsError(ValueError):
    """params.yaml failed the schema; `problems` holds one line per bad key (one problem: one line)."""

    def __init__(self, problems: list[str], source: str = "params.yaml"):
        self.problems = problems
        super().__init__(f"{source} is invalid: {problems[0]}" if len(problems) == 1 else
                         f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _prob(**kw: Any) -> Any:
    return Field(ge=0.0, le=1.0, **kw)


class DataParams(_Section):
    source: Literal["arc-agi-1", "arc-agi-2"]
    max_tasks: int | None = Field(ge=1)
    task_order: Literal["id", "size"]  # which max_tasks: the first ids, or the tasks of the smallest grids
    max_input_mb: int = Field(ge=1, le=100_000)  # tasks a user brings (prepare --input): larger input is refused


class AugmentParams(_Section):
    seed: int = Field(ge=0, le=2**32 - 1)
    samples_per_task: int = Field(ge=1, le=100_000)
    dihedral: bool
    color_permutation_prob: float = _prob()
    translation: bool
    max_tries_factor: int = Field(ge=1, le=100)


# The RLAN module forms a model file records (pipeline/model/io.py): the public code's, and the ones
# every model file of format 2 was built with (before the forms were options).
PUBLIC_FORMS = {"solver_candidate": "swiglu", "context_injector": "ffn", "hyperlora_delta": "dense"}
FORMS_BEFORE_OPTIONS = {"solver_candidate": "conv", "context_injector": "attention", "hyperlora_delta": "factored"}
FAMILIES = ("rlan", "trm")  # the model families (pipeline/model/family.py)


class ModelParams(_Section):
    family: Literal["rlan", "trm"]  # which family trains: RLAN (the keys below) or TRM (section `trm`)
    hidden_dim: int = Field(ge=8, le=4096, multiple_of=8)  # GroupNorm(8) in the encoder, MSRE and head
    max_clues: int = Field(ge=1, le=64)
    num_solver_steps: int = Field(ge=1, le=64)
    dsc_num_heads: int = Field(ge=1, le=64)  # set by the validated configuration; one score per clue whatever it is
    msre_encoding_dim: int = Field(ge=4, le=1024)
    msre_num_freq: int = Field(ge=1, le=64)
    dropout: float = Field(ge=0.0, lt=1.0)
    spatial_downsample: int = Field(ge=1, le=30)
    use_cross_attention_context: bool
    use_solver_context: bool
    solver_context_heads: int = Field(ge=1, le=64)
    use_gumbel_softmax: bool
    task_conditioned_clues: bool
    use_hyperlora: bool
    hyperlora_rank: int = Field(ge=1, le=256)
    hyperlora_scaling: float = Field(gt=0.0, le=100.0)
    hyperlora_dropout: float = Field(ge=0.0, lt=1.0)
    hyperlora_init_scale: float = Field(gt=0.0, le=10.0)
    # The forms of three modules (docs/model.md#differences-from-the-public-rlan-code): the public
    # code's by default, this project's earlier ones by name.
    solver_candidate: Literal["swiglu", "conv"]  # GRU candidate: SwiGLU of convolutions and the input embedding | plain conv
    context_injector: Literal["ffn", "attention"]  # cross-attention injector with its 4x feed-forward layer | without
    hyperlora_delta: Literal["dense", "factored"]  # H x H deltas on the targets' outputs | factors on the gates' inputs
    # The pair encoder's tokens: `cells` adds to each cell's token a 1x1 projection of that cell's own
    # input and output embeddings (docs/model.md#in-context-learning); `public` is the public encoder.
    pair_encoder: Literal["cells", "public"]


class TRMParams(_Section):
    """TRM's architecture and optimisation (used when model.family is trm); TRM's names in comments."""

    hidden_size: int = Field(ge=8, le=4096)
    num_heads: int = Field(ge=1, le=64)
    expansion: float = Field(gt=0.0, le=16.0)  # SwiGLU width: expansion x hidden x 2/3, rounded up to 256
    num_layers: int = Field(ge=1, le=16)  # L_layers: blocks of the one network
    h_cycles: int = Field(ge=1, le=64)  # H_cycles: answer updates per segment (gradient through the last)
    l_cycles: int = Field(ge=1, le=64)  # L_cycles: latent updates before each answer update
    mixer: Literal["attention", "mlp"]  # attention (RoPE) or the MLP over positions (mlp_t, no position code)
    puzzle_emb_len: int = Field(ge=1, le=64)  # positions in front of the grid; the embedding fills the first
    rms_norm_eps: float = Field(gt=0.0, le=1.0)
    rope_theta: float = Field(gt=0.0)
    halt_max_steps: int = Field(ge=1, le=64)  # supervision segments of a sample, at most (always all in evaluation)
    halt_exploration_prob: float = _prob()
    q_loss_weight: float = Field(ge=0.0, le=100.0)  # weight of the Q-head's halting loss
    global_batch_size: int = Field(ge=1, le=65_536)  # examples per optimizer step, over train.grad_accumulation_steps
    learning_rate: float = Field(gt=0.0, le=1.0)  # lr
    lr_warmup_steps: int = Field(ge=0)
    lr_min_ratio: float = _prob()  # cosine decay after the warm-up down to this share; 1.0 = constant
    beta1: float = Field(ge=0.0, lt=1.0)
    beta2: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0, le=10.0)
    puzzle_emb_lr: float = Field(gt=0.0, le=10.0)
    puzzle_emb_weight_decay: float = Field(ge=0.0, le=10.0)
    ema_decay: float = Field(ge=0.0, lt=1.0)  # ema_rate


class LooParams(_Section):
    enabled: bool
    loss_weight: float = Field(ge=0.0, le=100.0)
    # The rule `loo-min-pairs` asks for >= 2 (one pair held out, at least one left as context).
    min_pairs_for_loo: int = Field(ge=1, le=10)
    max_holdouts: int | None = Field(ge=1, le=10)  # held-out pairs per sample and step; None = every pair
    context_gradient: bool  # the LOO examples' context (encoded pairs) receives their gradient
    # public: the held-out pass's DSC at its default temperature 1.0 (the validated code accepts the
    # step's temperature and does not pass it on); training: at the training step's temperature
    temperature: Literal["public", "training"]


class EquivarianceParams(_Section):
    enabled: bool
    loss_weight: float = Field(ge=0.0, le=100.0)
    num_augmentations: int = Field(ge=1, le=7)
    # magnitude_and_direction: 0.3 (|dW| - |dW'|)^2 + 0.7 (1 - cos(dW, dW')), the validated code;
    # magnitude: (|dW| - |dW'|)^2 alone, the older form. Both with gradient through both deltas.
    compare: Literal["magnitude", "magnitude_and_direction"]
    # reencoded: the turned demonstration grids are encoded again (a real signal); rotated_features:
    # the already-encoded support features are turned, as the validated code does (mean pooling
    # makes that context the original's: a term near 0)
    context: Literal["reencoded", "rotated_features"]


class TrainParams(_Section):
    seed: int = Field(ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"]
    epochs: int = Field(ge=1, le=1_000_000)
    steps_per_epoch: int | None = Field(ge=1)
    batch_size: int = Field(ge=1, le=65_536)
    grad_accumulation_steps: int = Field(ge=1, le=1024)
    learning_rate: float = Field(gt=0.0, le=1.0)
    lr_schedule: Literal["constant", "cosine"]
    beta1: float = Field(ge=0.0, lt=1.0)
    beta2: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0, le=10.0)
    gradient_clip: float = Field(gt=0.0, le=1e6)
    hyperlora_lr_multiplier: float = Field(gt=0.0, le=1000.0)
    ema_decay: float = Field(ge=0.0, lt=1.0)
    temperature_start: float = Field(gt=0.0, le=100.0)
    temperature_end: float = Field(gt=0.0, le=100.0)
    entropy_on_raw_logits: bool
    lambda_kl_consistency: float = Field(ge=0.0, le=100.0)
    lambda_entropy: float = Field(ge=0.0, le=100.0)
    lambda_sparsity: float = Field(ge=0.0, le=100.0)
    min_clues: float = Field(ge=0.0, le=64.0)
    min_clue_weight: float = Field(ge=0.0, le=100.0)
    ponder_weight: float = Field(ge=0.0, le=100.0)
    use_best_step_selection: bool
    meta_learning_start_epoch: int = Field(ge=0)
    loo_training: LooParams
    equivariance_training: EquivarianceParams
    eval_every: int = Field(ge=1)
    save_every: int = Field(ge=1)
    checkpoint_minutes: float = Field(gt=0.0, le=10_080.0)
    heldout_tasks: int = Field(ge=0, le=10_000)
    max_consecutive_nonfinite: int = Field(ge=1, le=100_000)
    precision: Literal["bf16", "fp32"]
    activation_checkpointing: bool
    compile: bool
    max_cpu_hours: float = Field(gt=0.0)
    cpu_threads: int = Field(ge=1, le=1024)
    flush_denormals: bool
    nproc_per_node: int = Field(ge=1, le=1024)
    nnodes: int = Field(ge=1, le=100_000)
    rdzv_endpoint: str = Field(min_length=1, pattern=r"^[^:\s]+:\d{1,5}$")
    rdzv_id: str = Field(min_length=1, max_length=100)
    dist_timeout_s: int = Field(ge=10, le=86_400)


class EvaluateParams(_Section):
    seed: int = Field(ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"]
    views: Literal["fresh", "cache"]  # fresh: drawn augmented views; cache: the cached versions of each task
    max_versions: int | None = Field(ge=1)  # cache views: the first N versions of each task; null = all
    use_trm_style_eval: bool
    num_augmented_views: int = Field(ge=1, le=8)
    num_color_perms: int = Field(ge=1, le=1000)
    use_voting: bool
    use_inverse_aug: bool
    use_best_step_selection: bool
    pass_ks: tuple[int, ...] = Field(min_length=1)
    max_tasks: int | None = Field(ge=1)
    batch_size: int = Field(ge=1, le=65_536)

    @field_validator("pass_ks", mode="before")
    @classmethod
    def _list_to_tuple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("pass_ks")
    @classmethod
    def _ks_positive_increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 1 for k in v) or list(v) != sorted(set(v)):
            raise ValueError("must be distinct positive integers in increasing order")
        return v


class MonitoringParams(_Section):
    exact_match_gap_warning: float = _prob()
    exact_match_gap_critical: float = _prob()
    relative_gap_warning: float = Field(ge=0.0, le=100.0)
    relative_gap_critical: float = Field(ge=0.0, le=100.0)
    entropy_ratio_warning: float = Field(ge=1.0, le=1e6)
    entropy_ratio_critical: float = Field(ge=1.0, le=1e6)
    stop_value_gap_warning: float = _prob()
    stop_value_gap_critical: float = _prob()
    loss_ratio_warning: float = Field(ge=1.0, le=1e6)
    loss_ratio_critical: float = Field(ge=1.0, le=1e6)
    lora_collapse_ratio: float = Field(ge=0.0, lt=1.0)
    lora_growth_max: float = Field(gt=1.0)
    lora_diversity_min: float = Field(ge=0.0)
    loo_accuracy_min: float = _prob()
    loo_skipped_ratio_max: float = _prob()
    equiv_delta_norm_max: float = Field(gt=0.0)
    context_gain_min: float = Field(ge=-10.0, le=10.0)
    num_task_pictures: int = Field(ge=0, le=100)


class TrackingParams(_Section):
    experiment_name: str = Field(min_length=1, max_length=200)
    tracking_uri: str | None = Field(min_length=1)
    required: bool
    registered_model: str | None = Field(min_length=1, max_length=200, pattern=r"^[^/:@]+$")  # None: the family
    timeout_s: int = Field(ge=1, le=600)
    retry_s: int = Field(ge=0, le=3600)


class ValidationParams(_Section):
    # ids of error rules (pipeline/rules.py) this configuration breaks on purpose, e.g. to re-run a
    # failure mode of the seeds: each becomes a recorded warning ("accepted"), never a silent pass
    accept_broken_rules: tuple[str, ...]

    @field_validator("accept_broken_rules", mode="before")
    @classmethod
    def _list_to_tuple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v


class Params(_Section):
    data: DataParams
    augment: AugmentParams
    model: ModelParams
    trm: TRMParams
    train: TrainParams
    evaluate: EvaluateParams
    monitoring: MonitoringParams
    tracking: TrackingParams
    validation: ValidationParams

    def flat(self) -> dict[str, Any]:
        """All values with dotted keys (`train.loo_training.loss_weight`), for logging."""
        return flatten(self.model_dump())

    def override(self, changes: dict[str, Any]) -> Params:
        """A validated copy with dotted keys set, like `dvc exp run -S key=value`."""
        raw = self.model_dump()
        for dotted, value in changes.items():
            node = raw
            *parents, last = dotted.split(".")
            for part in parents:
                node = node[part]
            if last not in node:
                raise ParamsError([f"{dotted}: unknown key{did_you_mean(dotted, list(self.flat()))}"])
            node[last] = list(value) if isinstance(value, tuple) else value
        return parse_params(raw)


def schema_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (`train.loo_training.loss_weight`), from the models alone."""
    out: list[str] = []
    for name, info in (model or Params).model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += schema_keys(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def did_you_mean(key: str, known: list[str]) -> str:
    """' (did you mean X?)' for the known dotted key closest to a mistyped one, or ""."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    return f" (did you mean {close[0]}?)" if close else ""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


ABSENT = "(absent)"


def differences(old: Any, new: Any, labels: tuple[str, str]) -> list[str]:
    """`key: <old label> X, <new label> Y` for every dotted key whose value differs (values cut); a tree
    that is not a mapping counts as one value, `(top level)`."""
    a, b = ({"(top level)": t} if not isinstance(t, dict) else flatten(t) for t in (old, new))
    keys = [*a, *(k for k in b if k not in a)]
    return [f"{shorten(k)}: {labels[0]} {clip(a.get(k, ABSENT))}, {labels[1]} {clip(b.get(k, ABSENT))}"
            for k in keys if a.get(k, ABSENT) != b.get(k, ABSENT)]


# --- loading and error reporting ----------------------------------------------------------


def _field_at(loc: tuple[Any, ...]) -> Any:
    """The pydantic FieldInfo at a location path, or None."""
    model: Any = Params
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(part)
        if info is None:
            return None
        model = info.annotation
    return info


def _allowed(loc: tuple[Any, ...]) -> str:
    """A readable statement of what the field at `loc` accepts."""
    info = _field_at(loc)
    if info is None:
        return ""
    bounds = []
    for meta in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "a multiple of")):
            val = getattr(meta, attr, None)
            if val is not None:
                bounds.append(f"{sym} {val}")
    ann = info.annotation
    text = "allowed: " + (ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", ""))
    if bounds:
        text += ", " + " and ".join(bounds)
    return text


def _problem_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not isinstance(p, int) or e["type"] == "extra_forbidden")
        key = shorten(".".join(str(p) for p in loc))
        if e["type"] == "extra_forbidden":
            parent = _field_at(loc[:-1]) if len(loc) > 1 else None
            model = parent.annotation if parent is not None else Params
            fields = list(getattr(model, "model_fields", {}))
            parent_key = "".join(f"{p}." for p in loc[:-1])
            hint = did_you_mean(key, [parent_key + f for f in fields])
            lines.append(f"{key}: unknown key{hint} (known keys here: {', '.join(fields)})")
        elif e["type"] == "missing":
            lines.append(f"{key}: missing (every hyperparameter must be set in params.yaml)")
        else:
            allowed = _allowed(loc)
            got = e.get("input")
            lines.append(f"{key}: {e['msg']}, got {clip(got)}" + (f" ({allowed})" if allowed else ""))
    # one line per key: union types report each alternative; keep the first message per key
    seen, unique = set(), []
    for line in lines:
        k = line.split(":", 1)[0]
        if k not in seen:
            seen.add(k)
            unique.append(line)
    return unique


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError([f"top level must be a mapping of sections, got {type(raw).__name__}"], source)
    _reject_nonfinite(raw, "", source)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_problem_lines(err), source) from None


def _reject_nonfinite(tree: dict[str, Any], prefix: str, source: str) -> None:
    bad = [k for k, v in flatten(tree, prefix).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ParamsError([f"{shorten(k)}: must be a finite number" for k in bad], source)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe subset without aliases, without a key twice in one mapping and at most `MAX_DEPTH`
    levels deep."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "an alias (*name): aliases are not allowed in a params "
                                              "file (write the value out)", mark)
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep (a params "
                                              "file has 3)", self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node)
                if key in first:
                    raise ConstructorError(None, None, f"key {clip(key)} appears twice in one mapping (first on "
                                           f"line {first[key]}; YAML would keep the last silently)",
                                           key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str = "params.yaml") -> Any:
    """YAML text parsed by the strict loader; ParamsError (one line) on bad YAML, an alias or a repeated key."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ParamsError([f"not valid YAML: {where}{shorten(err.problem or err.context or '', 200)}"],
                          source) from None
    except yaml.YAMLError as err:
        raise ParamsError([f"not valid YAML: {shorten(str(err).splitlines()[0] if str(err) else '', 200)}"],
                          source) from None


def read_yaml(path: str | Path) -> Any:
    """A params file parsed defensively (see the module's doc); ParamsError naming the file and the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise ParamsError([f"{size:,} bytes, more than the {MAX_PARAMS_BYTES:,} a params file may have "
                               "(it holds a few KB of settings)"], str(path))
        data = path.read_bytes()
    except OSError as err:
        raise ParamsError([f"cannot be read ({err.strerror})"], str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError([f"not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); save it as "
                           "UTF-8"], str(path)) from None
    return parse_yaml(text, str(path))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ParamsError naming every bad key."""
    return parse_params(read_yaml(path), str(path))
