"""The model card (README.md) and metrics file that make an output dir describe itself."""

from __future__ import annotations

import json
from pathlib import Path

from finetune import __version__, adapters, models, rewards
from finetune.errors import plural
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

    return f"finetune {__version__}, transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, torch {torch.__version__}"


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


def model_card(recipe, prepared, metrics: dict, model, base: str) -> str:
    a, t, d = recipe.adapter, recipe.train, recipe.data
    trainable, total = models.count_parameters(model)
    train_stats = prepared.train.stats()
    eval_line = ""
    if prepared.eval is not None:
        eval_line = f"- eval: `{prepared.eval.source}`, {plural(prepared.eval.stats()['examples'], 'example')}\n"
    metric_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()))
    language = {"en": "en", "zh": "zh", "mixed": "[en, zh]"}.get(prepared.language or "", None)
    front = [
        "---",
        f"library_name: {'peft' if adapters.is_adapter(a.method) else 'transformers'}",
        f"base_model: {base}",
        f"pipeline_tag: {'text-classification' if recipe.stage == 'rm' else 'text-generation'}",
        f"tags: [finetune, {recipe.stage}, {a.method}]",
    ]
    if language:
        front.append(f"language: {language}")
    front.append("---")
    batch = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]
    auto = "AutoModelForSequenceClassification" if recipe.stage == "rm" else "AutoModelForCausalLM"
    return "\n".join(front) + f"""

# {Path(recipe.output.dir).name}

A **{a.method}** {"adapter for" if adapters.is_adapter(a.method) else "fine-tune (full model weights) of"} `{recipe.model.name_or_path}`, trained with finetune's `{recipe.stage}` stage.

## Base model
- `{recipe.model.name_or_path}` (loaded from `{base}`)

## Method
- {adapters.describe(a)}{_conversion_note(a)}
- trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)

## Data
- train: `{d.train}` ({prepared.format}), {rewards.card_data(recipe, train_stats) or f"{plural(train_stats['examples'], 'example')}, {train_stats['trained_tokens']} trained tokens of {train_stats['tokens']} (loss on answers only)"}
{eval_line}
## Hyper-parameters
| key | value |
|---|---|
| learning_rate | {t['learning_rate']:g} |
| lr_scheduler_type | {t['lr_scheduler_type']} |
| max_steps / epochs | {t['max_steps']} / {t['num_train_epochs']:g} |
| batch (per device x accumulation) | {batch} |
| max_length | {t.get('max_length', t.get('max_completion_length', t.get('response_length')))} |
| precision | {"bf16" if t['bf16'] else "fp16" if t['fp16'] else "fp32"} |
| seed | {t['seed']} |

{rewards.card_section(recipe)}The full resolved recipe is in `recipe.yaml`; training logs in `trainer_state.json`.

{_preference_section(metrics)}## Final metrics
| metric | value |
|---|---|
{metric_rows}

## Use it
```python
{_use_it(a.method, base, auto, recipe.stage)}
```

Trained with {_versions()}.
"""


def _conversion_note(a) -> str:
    if a.method in ("pissa", "olora"):
        return f" (saved converted: a rank-{2 * a.r} LoRA on the original base weights)"
    return ""


def _use_it(method: str, base: str, auto: str, stage: str) -> str:
    if not adapters.is_adapter(method):
        return f"""from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")"""
    return f"""from transformers import {auto}, AutoTokenizer
from peft import PeftModel

base = {auto}.from_pretrained("{base}"{", num_labels=1" if stage == "rm" else ""})
model = PeftModel.from_pretrained(base, "path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")"""
