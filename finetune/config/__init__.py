"""The typed recipe: YAML + `section.key=value` overrides -> a validated `Recipe`.

Every field is documented once, next to the field (`help`). The `train` section is not
re-declared here: it is validated against the fields of the stage's TRL config class
(SFTConfig for `stage: sft`), with our explicit defaults from `train_defaults()`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.config import defaults, methods
from finetune.config.defaults import STAGE_TRAIN_DEFAULTS, trl_config_class  # noqa: F401  (config's public API)
from finetune.config.distill import DISTILL_METHODS, DistillSection  # noqa: F401
from finetune.config.distill import check as check_distill
from finetune.config.rewards import RL_STAGES, RewardsSection  # noqa: F401
from finetune.config.rewards import check as check_rewards
from finetune.errors import RecipeError, closest
from finetune.resources import find_suite

# The stage registry: one module each in finetune/stages/ (finetune.stages.module).
STAGES = ("sft", "rm", "dpo", "kto", "orpo", "cpo", "simpo", "ppo", "grpo", "rloo", "distill")
ADAPTER_METHODS = (
    "lora",
    "dora",
    "qlora",
    "pissa",
    "olora",
    "adalora",
    "loha",
    "lokr",
    "vera",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "freeze",
    "full",
)  # config/methods.py, adapters.py
DATA_FORMATS = (
    "alpaca",
    "sharegpt",
    "messages",
    "prompt_completion",
    "text",
    "preference",
    "alpaca_preference",
    "sharegpt_preference",
    "kto",
    "prompt",
)
# What each stage trains on (formats that give it): checked when data.format is known.
PAIRED_FORMATS = ("preference", "alpaca_preference", "sharegpt_preference")
STAGE_FORMATS = {
    "sft": ("alpaca", "sharegpt", "messages", "prompt_completion", "text"),
    "distill": ("alpaca", "sharegpt", "messages", "prompt_completion", "text"),  # encoded as sft's
    **{s: PAIRED_FORMATS for s in ("rm", "dpo", "orpo", "cpo", "simpo")},
    "kto": ("kto",) + PAIRED_FORMATS,  # pairs are unpaired: chosen -> desirable, rejected -> undesirable
    # Prompts only: the last assistant turn / completion / chosen+rejected of a record is dropped.
    **{
        s: ("prompt", "alpaca", "sharegpt", "messages", "prompt_completion") + PAIRED_FORMATS
        for s in ("ppo", "grpo", "rloo")
    },
}
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Keys of `train` that are ours, not the TRL config's.
TRAIN_EXTRA_KEYS = {
    "resume": "auto (resume from the last complete checkpoint if a run was interrupted), "
    "never (start over), or the path of a checkpoint dir.",
}


def _f(default=dataclasses.MISSING, help: str = "", **kw):
    """A dataclass field with its documentation next to it."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelSection:
    name_or_path: str = _f(
        help="Hub id, local path, or a built-in tiny model (`tiny-llama`, built locally on first use)."
    )
    revision: str | None = _f(None, help="Hub revision (branch, tag or commit) of the model.")
    tokenizer: str | None = _f(None, help="Tokenizer id or path when it differs from the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", help="Weight dtype: auto = bfloat16 on a GPU that supports it, else float32."
    )
    attn_implementation: str | None = _f(
        None, help="e.g. sdpa, eager, flash_attention_2; None lets transformers pick."
    )
    chat_template: str | None = _f(
        None, help="A Jinja chat template (or the path of a .jinja file) replacing the tokenizer's."
    )
    chat_template_kwargs: dict[str, Any] = _f(
        {},
        help="Extra variables for the chat template, e.g. {enable_thinking: true}; "
        "used for training data (SFT, and the preference and RL stages' TRL rendering), chat and eval alike.",
    )
    trust_remote_code: bool = _f(False, help="Run code shipped with the model repo. Off unless you trust its author.")
    allow_pickle: bool = _f(False, help="Allow loading .bin/.pt (pickle) weights. Off: safetensors only.")


@dataclass
class AdapterSection:
    method: Literal[ADAPTER_METHODS] = _f(
        "lora",
        help="lora, dora (weight-decomposed LoRA), qlora (LoRA on a 4/8-bit base), pissa / olora (LoRA initialised "
        "from the SVD / QR of the weights), adalora, loha, lokr, vera, ia3, prompt_tuning, prefix_tuning, p_tuning, "
        "freeze (train some layers in full, no adapter), full (train every weight). See 'Adapter methods'.",
    )
    r: int = _f(8, help="Rank: LoRA family, adalora (target average rank), loha, lokr, vera.")
    alpha: int = _f(
        16, help="Alpha: LoRA family, adalora, loha, lokr (scale = alpha / r, or alpha / sqrt(r) with use_rslora)."
    )
    dropout: float = _f(0.05, help="Dropout on the adapter input: LoRA family, adalora, vera.")
    target_modules: str | list[str] | None = _f(
        "all-linear",
        help="Modules that get adapters: all-linear, or a list of names (q_proj, v_proj, ...); "
        "null = PEFT's default for the architecture (the ia3 default).",
    )
    modules_to_save: list[str] | None = _f(
        None, help="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    use_rslora: bool = _f(False, help="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = _f(False, help="DoRA on top of lora/qlora (method: dora sets it).")
    bias: Literal["none", "all", "lora_only"] = _f("none", help="Which biases are trained.")
    quant_bits: Literal[4, 8] = _f(4, help="qlora: 4-bit or 8-bit base weights (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", help="qlora 4-bit: NF4 or FP4 quantisation.")
    double_quant: bool = _f(True, help="qlora 4-bit: quantise the quantisation constants too.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", help="qlora: dtype of the matmuls (auto = bfloat16 on a bf16 GPU, else float32)."
    )
    loraplus_lr_ratio: float | None = _f(
        None,
        help="LoRA+ (lora, dora, qlora, pissa, olora): the B matrices learn at ratio x train.learning_rate "
        "(paper: 16). Uses AdamW with train.weight_decay and train.adam_*; train.optim is not used.",
    )
    init_r: int | None = _f(None, help="adalora: rank of every layer before pruning towards r (None = 1.5 x r).")
    feedforward_modules: list[str] | None = _f(
        None,
        help="ia3: which target_modules are feed-forward (scaled on their input); "
        "None = PEFT's default for the architecture.",
    )
    num_virtual_tokens: int = _f(20, help="prompt_tuning, prefix_tuning, p_tuning: number of virtual tokens.")
    init_text: str | None = _f(
        None, help="prompt_tuning: initialise the virtual tokens from the embeddings of this text (None = random)."
    )
    prefix_projection: bool = _f(
        False, help="prefix_tuning: train the prefix through a 2-layer MLP (P-tuning v2 without it)."
    )
    encoder_type: Literal["mlp", "lstm"] = _f("mlp", help="p_tuning: the prompt encoder, mlp or lstm.")
    encoder_hidden_size: int | None = _f(
        None,
        help="p_tuning, prefix_tuning with prefix_projection: hidden size of the encoder "
        "(None = the model's hidden size).",
    )
    trainable_layers: int = _f(2, help="freeze: train the last N decoder layers in full (0 = none).")
    trainable_modules: list[str] | None = _f(
        None, help="freeze: also train these modules, by dotted name part (e.g. lm_head, embed_tokens, mlp, layers.0)."
    )


@dataclass
class DataSection:
    train: str = _f(
        help="Training data: a name from data/datasets.yaml, a local file (json, jsonl, csv, parquet) "
        "or a hub dataset id."
    )
    format: Literal[DATA_FORMATS] | None = _f(
        None,
        help="Record format; optional for registry names (the registry says it). Preference stages: "
        "preference, alpaca_preference, sharegpt_preference, kto; RL stages: prompt (or any chat format).",
    )
    eval: str | None = _f(None, help="Held-out data (same forms as train).")
    eval_ratio: float = _f(0.0, help="Fraction of train held out for eval when no eval data is given (0 = none).")
    columns: dict[str, str] = _f(
        {}, help="Map the format's field names to your column names, e.g. {instruction: question}."
    )
    split: str = _f("train", help="Split of a hub dataset.")
    max_samples: int | None = _f(None, help="Use only the first N training records.")
    system: str | None = _f(None, help="System prompt added to chat examples that have none.")
    train_on: Literal["all_turns", "last_turn"] = _f(
        "all_turns",
        help="Chat data: train every assistant turn, or only the last one of each record. Each trained turn is "
        "trained on exactly its inference prompt (where the template renders a turn differently once later turns "
        "follow, it gets a sequence of its own; the dry-run plan says which).",
    )
    reasoning_tags: list[str] = _f(
        ["<think>", "</think>"],
        help="Open and close tags of reasoning written inline in an answer, and of the reasoning "
        "finetune writes inline for templates that have no reasoning support.",
    )
    registry: str | None = _f(
        None,
        help="Path of a datasets.yaml registry, or of LLaMA-Factory's dataset_info.json (docs/data.md has the "
        "mapping); default: ./data/datasets.yaml, then the shipped one.",
    )
    encoding: str | None = _f(
        None, help="Text encoding of local JSON/JSONL/CSV files, e.g. gb18030 (default: UTF-8, with or without a BOM)."
    )
    num_proc: int | None = _f(
        None, help="Processes that encode the data (default: the usable cores up to 8; 1 below 20k records)."
    )
    cache: Literal["auto", "off", "refresh"] = _f(
        "auto",
        help="Prepared-data cache: auto = reuse the encoded data when nothing it depends on changed; "
        "refresh = encode again and replace it; off (or false) = encode into a temp dir, every rank for itself.",
    )
    streaming: bool = _f(
        False, help="Read and encode while training (data larger than RAM or disk); needs train.max_steps."
    )
    skip_bad_rows: bool = _f(
        False,
        help="Skip bad records (malformed JSON lines, records a format rejects) instead of stopping, streamed "
        "data too; the run reports how many and the first few.",
    )
    image_max_pixels: int | None = _f(
        None,
        help="Vision-language models: resize images larger than this many pixels (width x height) before they "
        "become image tokens, where the model's image processor takes a pixel budget (Qwen2-VL family).",
    )
    image_min_pixels: int | None = _f(
        None, help="Vision-language models: resize images smaller than this many pixels up (see image_max_pixels)."
    )


@dataclass
class OutputSection:
    dir: str = _f(help="Where the run's output goes; a finished dir is never overwritten unless overwrite is true.")
    overwrite: bool = _f(False, help="Replace an existing non-empty output dir.")
    keep_checkpoints: bool = _f(
        False, help="Keep the checkpoint-N dirs in the finished output (they are removed by default)."
    )


@dataclass
class EvalSection:
    """Optional: evaluation after training (finetune.eval.after_training); absent = none."""

    data: str | None = _f(
        None,
        help="Dataset for generation metrics (registry name, file or hub id); "
        "default: the run's held-out split (data.eval or data.eval_ratio; SFT only).",
    )
    max_samples: int | None = _f(200, help="Score at most this many examples (null = all).")
    max_new_tokens: int = _f(128, help="Greedy generation length limit per answer.")
    batch_size: int = _f(16, help="Prompts per generation batch (left-padded, sorted by length).")
    language: Literal["auto", "en", "zh"] = _f(
        "auto",
        help="BLEU tokenizer: en = sacrebleu 13a, zh = sacrebleu zh; auto = zh if the references contain CJK text.",
    )
    metric_style: Literal["standard", "llamafactory"] = _f(
        "standard",
        help="standard = sacrebleu + rouge-score; llamafactory = LLaMA-Factory's character BLEU-4 and jieba ROUGE.",
    )
    rouge_tokenizer: Literal["chars", "jieba"] = _f(
        "chars", help="ROUGE tokens: chars = each CJK character + ASCII words; jieba = jieba words."
    )
    suite: str | None = _f(
        None, help="Capability suite YAML (e.g. eval/suites/general.yaml) scored on the tuned and the base model."
    )
    history: str | None = _f(
        None, help="JSONL file the results are appended to (default: eval_history.jsonl beside output.dir)."
    )
    fail_on_regression: bool = _f(
        False,
        help="Exit 1 when the suite gate finds a regression (or eval fails); the output stays, marked in its card.",
    )


RESUME_VOLATILE = (("train", "resume"), ("output", "overwrite"), ("output", "keep_checkpoints"))
SECTIONS = {
    "model": ModelSection,
    "adapter": AdapterSection,
    "data": DataSection,
    "output": OutputSection,
    "rewards": RewardsSection,  # rewards: the RL stages (finetune/rewards.py)
    "distill": DistillSection,  # distill: stage distill (finetune/stages/distill.py)
    "eval": EvalSection,
}
OPTIONAL_SECTIONS = ("eval",)
TOP_LEVEL = ("stage", "model", "adapter", "data", "train", "rewards", "distill", "output", "eval")


@dataclass
class Recipe:
    stage: str
    model: ModelSection
    adapter: AdapterSection
    data: DataSection
    train: dict[str, Any]  # effective kwargs for the stage's TRL config (+ TRAIN_EXTRA_KEYS)
    output: OutputSection
    source: str | None = None  # the YAML file it came from
    rewards: RewardsSection = field(default_factory=RewardsSection)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection | None = None  # optional section: absent = no evaluation after training
    # "section.key" -> where its value came from: recipe | override | default | stage default | method default
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict:
        out = {"stage": self.stage}
        for name in SECTIONS:
            if name == "distill" and self.stage != "distill":
                continue  # stage distill's own section (recipe.yaml of the other stages stays as it was)
            if getattr(self, name) is not None:
                out[name] = dataclasses.asdict(getattr(self, name))
        out["train"] = dict(self.train)
        return {k: out[k] for k in TOP_LEVEL if k in out}

    def dump(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False, allow_unicode=True)

    def identity(self) -> str:
        """What makes two runs the same training (`identity()`), as YAML: the resume stamp."""
        return yaml.safe_dump(identity(self.to_dict()), sort_keys=False, allow_unicode=True)


def identity(recipe: dict) -> dict:
    """A recipe (as dumped, or a parsed `recipe.yaml`) less what does not change the training:
    the `eval:` section and the keys that may change between an interrupted run and its
    resumption. The one comparison of "same recipe" for resume, pipeline re-runs and output dirs."""
    d = _plain(recipe)
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    d.pop("eval", None)  # evaluation settings do not change the training
    for section, key in RESUME_VOLATILE:
        (d.get(section) or {}).pop(key, None)
    return d


def _plain(value):
    """Enums and other TRL types -> YAML-safe plain values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value


# ----------------------------------------------------------------------------- loading


class _Where:
    """Names a place in a recipe: `file:line: field` or `override 'k=v': field`."""

    def __init__(self, source: str | None, lines: dict[tuple, int]):
        self.source, self.lines, self.overridden = source, lines, {}

    def __call__(self, path: tuple) -> str:
        key = ".".join(str(p) for p in path)
        for n in range(len(path), 0, -1):
            if path[:n] in self.overridden:
                return f"override '{self.overridden[path[:n]]}': {key}"
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.source or 'recipe'}:{self.lines[path[:n]]}: {key}"
        return f"{self.source or 'recipe'}: {key}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML lets the later one win silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first given on line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str):
    """`yaml.safe_load` (duplicate keys refused) whose syntax errors are one line:
    `file:line: invalid YAML: problem`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if context is not None and mark is not None and context.line != mark.line:
            problem += f" ({getattr(e, 'context', None) or 'started'} on line {context.line + 1})"
        raise RecipeError(f"{source}{line}: invalid YAML: {problem}") from None


def line_map(text: str) -> dict[tuple, int]:
    """(key or list index, ...) -> 1-based line of that node in the YAML text (recipes, pipelines, suites)."""
    lines: dict[tuple, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (key_node.value,)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[prefix + (i,)] = item.start_mark.line + 1
                walk(item, prefix + (i,))

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return lines


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in item:
        raise RecipeError(f"override '{item}': expected section.key=value")
    key, raw = item.split("=", 1)
    path = tuple(p for p in key.strip().split("."))
    if not all(path):
        raise RecipeError(f"override '{item}': expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def load(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, text: str | None = None
) -> Recipe:
    """Read a recipe file (or `text`), apply `section.key=value` overrides, validate, fill defaults."""
    source = str(path) if path is not None else None
    if text is None:
        if path is None:
            raise RecipeError("no recipe given")
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        text = p.read_text(encoding="utf-8")
    raw = parse_yaml(text, source or "recipe")
    raw = {} if raw is None else raw
    where = _Where(source, line_map(text))
    if not isinstance(raw, dict):
        raise RecipeError(f"{source or 'recipe'}: a recipe is a mapping of sections ({', '.join(TOP_LEVEL)})")

    for item in overrides:
        keys, value = _parse_override(item)
        where.overridden[keys] = item
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise RecipeError(f"override '{item}': {k} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return _validate(raw, where, source)


def _validate(raw: dict, where: _Where, source: str | None) -> Recipe:
    for key in raw:
        if key not in TOP_LEVEL:
            hint = closest(str(key), TOP_LEVEL) or _section_of(str(key), raw.get("stage", "sft"))
            raise RecipeError(f"{where((key,))}: unknown section{hint} (sections: {', '.join(TOP_LEVEL)})")
    origins = {"stage": _origin(("stage",), where) if "stage" in raw else "default: the recipe names no stage"}
    stage = _coerce(raw.get("stage", "sft"), Literal[STAGES], ("stage",), where)
    adapter = raw.get("adapter") if isinstance(raw.get("adapter"), dict) else {}
    method = _coerce(adapter.get("method", "lora"), Literal[ADAPTER_METHODS], ("adapter", "method"), where)
    table = defaults.table(stage, method, default_bf16())  # one defaults table, filled in before validation
    sections = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name)
        if value is None and name in ("adapter", "rewards", "distill"):
            value = {}
        if value is None and name in OPTIONAL_SECTIONS:
            continue
        if value is None:
            raise RecipeError(f"{where((name,))}: missing section '{name}'")
        if isinstance(value, dict):
            origins.update({f"{name}.{key}": _origin((name, key), where) for key in value})
            filled = {
                key: default for (section, key), (default, _) in table.items() if section == name and key not in value
            }
            origins.update({f"{name}.{key}": table[(name, key)][1] for key in filled})
            value = {**value, **filled}
        sections[name] = _build(cls, value, (name,), where)
    train = _validate_train(stage, raw.get("train") or {}, where, table, origins)
    data = sections["data"]
    if (data.eval or data.eval_ratio) and "eval_strategy" not in (raw.get("train") or {}):
        # A held-out split is evaluated during training (a loss curve, not one point at the end).
        train.update(eval_strategy="steps", eval_steps=train.get("eval_steps") or EVAL_STEPS_WITH_EVAL_SPLIT)
        origins["train.eval_strategy"] = "default"
        origins.setdefault("train.eval_steps", "default")
    recipe = Recipe(stage=stage, train=train, source=source, origins=origins, **sections)
    methods.check(recipe, raw.get("train") or {}, where, raw.get("adapter") or {})
    _cross_checks(recipe, where)
    return recipe


def _origin(path: tuple, where: _Where) -> str:
    return "override" if any(path[:n] in where.overridden for n in range(1, len(path) + 1)) else "recipe"


def _section_of(key: str, stage) -> str:
    """`; did you mean 'train.max_steps'?` for a key given without its section (max_steps=5)."""
    import difflib

    keys = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)]
    if stage in STAGES:
        keys += [f"train.{f.name}" for f in fields(trl_config_class(stage)) if f.init] + [
            f"train.{k}" for k in TRAIN_EXTRA_KEYS
        ]
    by_name = {}
    for k in keys:
        by_name.setdefault(k.split(".", 1)[1], k)
    match = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.8)
    return f"; did you mean '{by_name[match[0]]}'?" if match else ""


def _suggest_key(key: str, cls) -> str:
    """`; did you mean 'x'?`: the closest spelling, else the key whose help opens with it (adapter.rank -> r),
    also for the spelling without another tool's prefix (lora_alpha -> alpha, lora_rank -> r)."""
    names = [f.name for f in fields(cls)]
    words = key.lower().replace("-", "_").split("_")
    for candidate in dict.fromkeys([key, "_".join(words[1:])]):
        if not candidate:
            continue
        hint = closest(candidate, names)
        if hint:
            return hint
        for f in fields(cls):
            if f.metadata.get("help", "").split(":")[0].strip().lower() == candidate.replace("_", " "):
                return f"; did you mean '{f.name}'?"
    return ""


def _build(cls, raw, path: tuple, where: _Where):
    if not isinstance(raw, dict):
        raise RecipeError(f"{where(path)}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            raise RecipeError(f"{where(path + (key,))}: unknown key{_suggest_key(str(key), cls)}")
    kwargs = {}
    for f in fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], path + (f.name,), where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(
                f"{where(path)}: missing required key '{'.'.join(path + (f.name,))}' ({f.metadata['help']})"
            )
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value, tp, path: tuple, where: _Where):
    """Check `value` against the annotation `tp`, converting the obvious (e.g. '1e-3' -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = RecipeError(f"{where(path)}: expected {_type_name(tp)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # 1e400, .inf, .nan
        raise RecipeError(f"{where(path)}: {value!r} is not a finite number")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message is the helpful one
            return _coerce(value, options[0], path, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, where)
            except RecipeError:
                continue
        raise bad
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/no as false and on/yes as true (data.cache: off)
            spelled = ("off", "no", "false") if not value else ("on", "yes", "true", "auto")
            value = next((c for c in spelled if c in args), value)
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        hint = closest(str(value), [str(a) for a in args])
        raise RecipeError(f"{where(path)}: {value!r} is not one of {', '.join(str(a) for a in args)}{hint}")
    if origin is list:
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # train.loss_type=ipo means [ipo]
        items = value if isinstance(value, list) else None
        if items is None:
            raise bad
        return [_coerce(v, args[0] if args else Any, path, where) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if not math.isfinite(number):
                    raise RecipeError(f"{where(path)}: {value!r} is not a finite number")
                return number
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if value is False and "no" in [e.value for e in tp]:
            value = "no"  # YAML 1.1 reads a bare `no` as false (save_strategy: no)
        try:
            return tp(value).value
        except ValueError:
            choices = [e.value for e in tp]
            raise RecipeError(
                f"{where(path)}: {value!r} is not one of {', '.join(map(str, choices))}{closest(str(value), choices)}"
            ) from None
    return value  # complex TRL types (dicts, callables...) are checked by the TRL config itself


# ----------------------------------------------------------------------------- train section


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX), where bf16 autocast
    trained a 25M-param model ~1.6x faster than fp32 (bench/README.md)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def default_bf16() -> bool:
    import torch

    return _cuda_bf16() if torch.cuda.is_available() else _cpu_native_bf16()


def train_defaults(stage: str) -> dict[str, Any]:
    """The common and stage train defaults on this machine (config.defaults.train_defaults)."""
    return defaults.train_defaults(stage, default_bf16())


# With data.eval or data.eval_ratio and no train.eval_strategy: evaluate every 10% of the steps.
EVAL_STEPS_WITH_EVAL_SPLIT = 0.1

# transformers 5 renamed these; accept the old names users know, as aliases.
TRAIN_ALIASES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
# Set by finetune itself, from other sections.
TRAIN_RESERVED = {"output_dir": "output.dir", "use_cpu": "the device", "dataset_text_field": "data.format"}


def _validate_train(stage: str, raw, where: _Where, table: dict, origins: dict[str, str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where(('train',))}: expected a mapping of keys, got {type(raw).__name__}")
    cls = trl_config_class(stage)
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls) if f.init]
    out = {key: default for (section, key), (default, _) in table.items() if section == "train"}
    origins.update({f"train.{key}": table[("train", key)][1] for key in out})
    for key, value in raw.items():
        path = ("train", key)
        origins[f"train.{TRAIN_ALIASES.get(key, key)}"] = _origin(path, where)
        if key in TRAIN_RESERVED:
            raise RecipeError(f"{where(path)}: set by finetune from {TRAIN_RESERVED[key]}; remove it")
        if key in TRAIN_EXTRA_KEYS:
            out[key] = _coerce(value, str, path, where) if value is not False else "never"
            continue
        if key not in valid:
            raise RecipeError(
                f"{where(path)}: unknown key for {cls.__name__}{closest(str(key), valid + list(TRAIN_EXTRA_KEYS))}"
            )
        out[TRAIN_ALIASES.get(key, key)] = _coerce(value, hints.get(key, Any), path, where)
    return out


def _cross_checks(recipe: Recipe, where: _Where) -> None:
    d, a, t = recipe.data, recipe.adapter, recipe.train
    check_stage_format(recipe.stage, d.format, lambda: where(("data", "format")))
    check_rewards(recipe.stage, recipe.rewards, where)
    check_distill(recipe.stage, recipe.distill, where, recipe.origins)
    if d.eval and d.eval_ratio:
        raise RecipeError(f"{where(('data', 'eval_ratio'))}: give data.eval or data.eval_ratio, not both")
    if not 0.0 <= d.eval_ratio < 1.0:
        raise RecipeError(f"{where(('data', 'eval_ratio'))}: must be in [0, 1), got {d.eval_ratio}")
    if len(d.reasoning_tags) != 2 or not all(isinstance(t, str) and t.strip() for t in d.reasoning_tags):
        raise RecipeError(
            f"{where(('data', 'reasoning_tags'))}: expected [open tag, close tag], got {d.reasoning_tags}"
        )
    if recipe.eval is not None:
        if recipe.stage == "rm":
            raise RecipeError(
                f"{where(('eval',))}: a reward model does not generate; score it with `finetune score` instead"
            )
        for key in ("max_samples", "max_new_tokens", "batch_size"):
            if getattr(recipe.eval, key) is not None and getattr(recipe.eval, key) < 1:
                raise RecipeError(f"{where(('eval', key))}: must be at least 1")
        if recipe.eval.suite and not Path(find_suite(recipe.eval.suite)).is_file():
            raise RecipeError(f"{where(('eval', 'suite'))}: {recipe.eval.suite}: file not found")
    if d.encoding is not None:
        import codecs

        try:
            codecs.lookup(d.encoding)
        except LookupError:
            raise RecipeError(
                f"{where(('data', 'encoding'))}: unknown encoding {d.encoding!r} (e.g. utf-8, gb18030, big5)"
            ) from None
    if d.max_samples is not None and d.max_samples < 1:
        raise RecipeError(f"{where(('data', 'max_samples'))}: must be at least 1")
    if d.num_proc is not None and d.num_proc < 1:
        raise RecipeError(f"{where(('data', 'num_proc'))}: must be at least 1")
    if d.streaming and t["max_steps"] <= 0:
        raise RecipeError(f"{where(('data', 'streaming'))}: a stream has no known length; set train.max_steps")
    if d.streaming and recipe.stage != "sft":
        raise RecipeError(f"{where(('data', 'streaming'))}: streaming is for the sft stage only")
    if a.r < 1:
        raise RecipeError(f"{where(('adapter', 'r'))}: must be at least 1")
    if a.alpha <= 0:
        raise RecipeError(f"{where(('adapter', 'alpha'))}: must be positive, got {a.alpha}")
    if not 0.0 <= a.dropout < 1.0:
        raise RecipeError(f"{where(('adapter', 'dropout'))}: must be in [0, 1)")
    if t.get("max_length") is not None and t["max_length"] < 8:
        raise RecipeError(f"{where(('train', 'max_length'))}: must be at least 8 (or null for no limit)")
    if t.get("bf16") and t.get("fp16"):
        raise RecipeError(f"{where(('train', 'fp16'))}: bf16 and fp16 are both on; pick one")
    for key in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if t[key] <= 0:
            raise RecipeError(f"{where(('train', key))}: must be positive, got {t[key]}")
    for key in ("save_steps", "logging_steps", "eval_steps"):
        if t.get(key) is not None and t[key] <= 0:
            raise RecipeError(f"{where(('train', key))}: must be positive, got {t[key]}")
    if t["max_steps"] <= 0 and t["num_train_epochs"] <= 0:
        raise RecipeError(
            f"{where(('train', 'num_train_epochs'))}: set train.max_steps or a positive train.num_train_epochs"
        )
    if "report_to" in t:
        _check_trackers(t["report_to"], where)
    resume = t["resume"]
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise RecipeError(f"{where(('train', 'resume'))}: {resume!r} is neither auto, never nor a checkpoint dir")


# train.report_to: the trackers transformers' Trainer reports to, and the modules each needs (any one of them).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
    "neptune": ("neptune",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
    "codecarbon": ("codecarbon",),
    "azure_ml": ("azureml",),
    "dagshub": ("dagshub",),
    "flyte": ("flytekit",),
    "kubeflow": ("kubeflow",),
}


def _check_trackers(report_to, where) -> None:
    """Each tracker of train.report_to is known and installed: else a one-line error now, not a traceback mid-run."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in TRACKERS:
            raise RecipeError(
                f"{where(('train', 'report_to'))}: unknown tracker {name!r}{closest(str(name), TRACKERS)} "
                f"(one of {', '.join(TRACKERS)}, or none)"
            )
        if not any(importlib.util.find_spec(module) for module in TRACKERS[name]):
            package = TRACKERS[name][0].replace("_", "-")
            raise RecipeError(
                f"{where(('train', 'report_to'))}: {name} is not installed; `pip install {package}`, "
                f"or remove it from train.report_to"
            )


def check_stage_format(stage: str, fmt: str | None, where) -> None:
    """Raise if records of format `fmt` cannot feed `stage` (`where()` names the place)."""
    allowed = STAGE_FORMATS[stage]
    if fmt is not None and fmt not in allowed:
        raise RecipeError(f"{where()}: stage {stage} takes {', '.join(allowed)} records, not {fmt}")


def field_docs() -> dict[str, list[tuple[str, str, str]]]:
    """section -> [(key, default, help)]: the recipe reference, generated from the schema."""
    docs = {}
    for name, cls in SECTIONS.items():
        rows = []
        for f in fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            rows.append((f.name, default, f.metadata.get("help", "")))
        docs[name] = rows
    return docs
