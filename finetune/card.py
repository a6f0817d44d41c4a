"""The model card (README.md) and metrics file that make an output dir describe itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune import __version__, adapters, rewards
from finetune.errors import FinetuneError, plural
from finetune.outputs import write_text_atomic


def write_metrics(out: Path, metrics: dict) -> None:
    write_text_atomic(out / "all_results.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _versions() -> str:
    import peft
    import torch
    import transformers
    import trl

    return (
        f"finetune {__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"trl {trl.__version__}, torch {torch.__version__}"
    )


# Preference stages: what the eval split says (rm: pairwise accuracy; dpo/kto/...: implicit rewards).
_PREFERENCE_METRICS = {
    "eval_accuracy": "pairwise accuracy (reward of chosen > rejected) on the eval split",
    "eval_margin": "mean reward margin (chosen - rejected) on the eval split",
    "eval_rewards/accuracies": "implicit-reward accuracy (chosen above rejected) on the eval split",
    "eval_rewards/margins": "mean implicit-reward margin on the eval split",
    "train_dropped_examples": "training examples dropped as longer than train.max_length",
    "eval_dropped_examples": "eval examples dropped as longer than train.max_length",
}


def _preference_section(metrics: dict) -> str:
    lines = [f"- {what}: {_fmt(metrics[key])}" for key, what in _PREFERENCE_METRICS.items() if key in metrics]
    return "## Preference results\n" + "\n".join(lines) + "\n\n" if lines else ""


# Trainer metrics that describe the machine and the moment, not the model: kept out of the card.
RUNTIME_NOISE = ("runtime", "samples_per_second", "steps_per_second", "total_flos", "num_tokens")


def card_metrics(metrics: dict) -> dict:
    """The metrics a card reports: losses, accuracies, rewards... without runtime and throughput figures."""
    return {k: v for k, v in metrics.items() if not any(noise in k for noise in RUNTIME_NOISE)}


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hugging Face Hub id (what `base_model:` / `datasets:` may hold), else None:
    local paths, cache dirs and finetune's built-in tiny models are not."""
    from finetune import tiny

    if not name or tiny.is_tiny(name) or name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        return None
    return name if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) else None


def dataset_ids(recipe) -> list[str]:
    """What `datasets:` lists: hub ids as they are, registry entries by their hub id or registry name,
    files by their name (so a card says what it was trained on even for local data)."""
    from finetune.data import sources

    out = []
    for name in (recipe.data.train, recipe.data.eval):
        if not name:
            continue
        try:
            src = sources.locate(name, split=recipe.data.split, registry=recipe.data.registry)
        except FinetuneError:
            continue
        if src.hub and not Path(src.hub).expanduser().exists():
            out.append(src.hub)  # a hub dataset, given directly or through the registry
        elif Path(name).expanduser().exists():
            out.append(Path(name).name)  # a local file or folder
        else:
            out.append(name)  # a registry name for a local file
    return list(dict.fromkeys(out))


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]{3,}")


def detect_languages(texts) -> list[str]:
    """ISO codes of the languages in `texts` as far as a card needs them: zh (CJK characters), en (Latin words)."""
    texts = list(texts)
    found = []
    if sum(bool(_LATIN_WORD.search(t)) for t in texts) > len(texts) / 10:
        found.append("en")
    if sum(bool(_CJK.search(t)) for t in texts) > len(texts) / 10:
        found.append("zh")
    return found


def languages(prepared, tokenizer=None, sample: int = 200) -> list[str]:
    """The registry's language, else detected on the trained text (answers, not the chat template's words)."""
    known = {"en": ["en"], "zh": ["zh"], "mixed": ["en", "zh"]}.get(prepared.language or "")
    if known:
        return known
    split = prepared.train
    if hasattr(split, "examples"):
        texts = [json.dumps(e, ensure_ascii=False) for e in split.examples[:sample]]
    elif tokenizer is not None:
        from finetune.data.encode import IGNORE

        texts = [
            tokenizer.decode([i for i, label in zip(e.input_ids, e.labels) if label != IGNORE])
            for e in split.encoded[:sample]
        ]
    else:
        return []
    return detect_languages(texts)


def card_data(recipe, prepared, tokenizer=None, chained: dict | None = None):
    """The card's metadata (huggingface_hub's ModelCardData): what the Hub indexes and filters on
    (a chained stage's `base_model` is the original model its parents were trained on)."""
    from huggingface_hub import ModelCardData

    a = recipe.adapter
    return ModelCardData(
        library_name="peft" if adapters.is_adapter(a.method) else "transformers",
        base_model=hub_id(chained["base"] if chained else recipe.model.name_or_path),
        pipeline_tag="text-classification" if recipe.stage == "rm" else "text-generation",
        tags=["finetune", recipe.stage, a.method],
        datasets=dataset_ids(recipe) or None,
        language=languages(prepared, tokenizer) or None,
    )


def model_card(recipe, prepared, metrics: dict, model, base: str, chained: dict | None = None, tokenizer=None) -> str:
    """README.md of an output dir: metadata from `card_data`, then what a reader needs to trust and use it.
    `chained`: a chained stage's base description (outputs.record_base): `base` is then the original model,
    and the card says which adapters to merge into it first."""
    from huggingface_hub import ModelCard

    a, t, d = recipe.adapter, recipe.train, recipe.data
    trainable, total = adapters.count_parameters(model)
    train_stats = prepared.train.stats()
    eval_line = ""
    if prepared.eval is not None:
        eval_line = f"- eval: `{prepared.eval.source}`, {plural(prepared.eval.stats()['examples'], 'example')}\n"
    metric_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(card_metrics(metrics).items()))
    front = card_data(recipe, prepared, tokenizer, chained).to_yaml()
    batch = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]
    auto = "AutoModelForSequenceClassification" if recipe.stage == "rm" else "AutoModelForCausalLM"
    train_data = rewards.card_data(recipe, train_stats) or (
        f"{plural(train_stats['examples'], 'example')}, {'about ' if train_stats.get('sampled') else ''}"
        f"{train_stats['trained_tokens']} trained tokens of {train_stats['tokens']} (loss on answers only)"
    )
    return str(
        ModelCard(
            f"---\n{front}\n---\n"
            + f"""
# {Path(recipe.output.dir).name}

A **{a.method}** {"adapter for" if adapters.is_adapter(a.method) else "fine-tune (full model weights) of"} \
`{recipe.model.name_or_path}`, trained with finetune's `{recipe.stage}` stage.

## Base model
{_base_section(recipe, base, chained)}

## Method
- {adapters.describe(a)}{_conversion_note(a)}
- trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)

## Data
- train: `{d.train}` ({prepared.format}), {train_data}
{eval_line}
## Hyper-parameters
| key | value |
|---|---|
| learning_rate | {t["learning_rate"]:g} |
| lr_scheduler_type | {t["lr_scheduler_type"]} |
| max_steps / epochs | {t["max_steps"]} / {t["num_train_epochs"]:g} |
| batch (per device x accumulation) | {batch} |
| max_length | {t.get("max_length", t.get("max_completion_length", t.get("response_length")))} |
| precision | {"bf16" if t["bf16"] else "fp16" if t["fp16"] else "fp32"} |
| seed | {t["seed"]} |

{rewards.card_section(recipe)}The full resolved recipe is in `recipe.yaml`; training logs in `trainer_state.json`.

{_preference_section(metrics)}## Final metrics
| metric | value |
|---|---|
{metric_rows}

## Use it
```python
{_use_it(a.method, base, auto, recipe.stage, chained)}
```

Trained with {_versions()}.
"""
        )
    )


def _conversion_note(a) -> str:
    if a.method in ("pissa", "olora"):
        return f" (saved converted: a rank-{2 * a.r} LoRA on the original base weights)"
    return ""


def _base_section(recipe, base: str, chained: dict | None) -> str:
    if not chained:
        return f"- `{recipe.model.name_or_path}` (loaded from `{base}`)"
    parents = "\n".join(
        f"  {i}. `{p['relative']}` (`{p['dir']}`, content fingerprint {p['fingerprint']})"
        for i, p in enumerate(chained["adapters"], 1)
    )
    return (
        f"- `{chained['base']}` (loaded from `{base}`) with these adapters merged into it, in order:\n{parents}\n"
        "- recorded in `base.json`: finetune's merge, export, chat and eval rebuild this base from it (and "
        "refuse a parent adapter that was retrained since); paths are also kept relative to this dir, so copy "
        "the parents along"
    )


def _use_it(method: str, base: str, auto: str, stage: str, chained: dict | None = None) -> str:
    if not adapters.is_adapter(method):
        return f"""from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")"""
    merges = "".join(
        f'base = PeftModel.from_pretrained(base, "{p["relative"]}").merge_and_unload()\n'
        for p in (chained or {}).get("adapters", [])
    )
    if merges:  # the parents are causal LMs: merge them first, then add the head of a reward model
        merges = "# merge the parent stages' adapters first (paths relative to this dir)\n" + merges
        head = (
            ""
            if stage != "rm"
            else (f'\nbase.save_pretrained("merged-base")\nbase = {auto}.from_pretrained("merged-base", num_labels=1)')
        )
        imports = ", ".join(dict.fromkeys(["AutoModelForCausalLM", auto, "AutoTokenizer"]))
        return f"""from transformers import {imports}
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{base}")
{merges}{head}
model = PeftModel.from_pretrained(base, "path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")"""
    return f"""from transformers import {auto}, AutoTokenizer
from peft import PeftModel

base = {auto}.from_pretrained("{base}"{", num_labels=1" if stage == "rm" else ""})
model = PeftModel.from_pretrained(base, "path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")"""


# Sections of an adapter's card that a model merged from it carries over (its provenance).
PROVENANCE_SECTIONS = (
    "Base model",
    "Method",
    "Data",
    "Hyper-parameters",
    "Preference results",
    "Final metrics",
    "Evaluation",
)


def _sections(text: str) -> dict[str, str]:
    """`## Title` -> its body, for a card's markdown."""
    out, title, lines = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if title:
                out[title] = "\n".join(lines).strip()
            title, lines = line[3:].strip(), []
        elif title:
            lines.append(line)
    if title:
        out[title] = "\n".join(lines).strip()
    return out


def add_provenance(card_file: Path, adapter_dirs) -> None:
    """Give a merged model's card the provenance of the adapter(s) it came from: their data, method,
    hyper-parameters and metrics (sections of their cards), `datasets:` and `language:`, and a hub
    `base_model:` instead of a local path."""
    from huggingface_hub import ModelCard

    merged = ModelCard.load(card_file)
    parts, bases = [], []
    for adapter in adapter_dirs:
        source = Path(adapter) / "README.md"
        if not source.is_file():
            parts.append(f"### From `{adapter}`\n\n(no model card there)")
            continue
        own = ModelCard.load(source)
        for key in ("datasets", "language"):
            values = [*(getattr(merged.data, key) or []), *_as_list(getattr(own.data, key, None))]
            setattr(merged.data, key, list(dict.fromkeys(values)) or None)
        bases.append(getattr(own.data, "base_model", None))
        sections = _sections(own.text)
        body = "\n\n".join(f"#### {title}\n{sections[title]}" for title in PROVENANCE_SECTIONS if title in sections)
        parts.append(f"### From `{adapter}`\n\n{body}")
    hub_bases = {b for b in bases if b}
    merged.data.base_model = hub_id(merged.data.base_model) or (hub_bases.pop() if len(hub_bases) == 1 else None)
    merged.text = merged.text.rstrip() + "\n\n## Provenance\n\n" + "\n\n".join(parts) + "\n"
    write_text_atomic(card_file, str(merged))


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)
