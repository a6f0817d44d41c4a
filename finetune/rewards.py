"""The `rewards:` recipe section: what scores a completion in the online RL stages.

- `rewards.model`: an `rm` output dir. PPO's reward model (and the start of its value model);
  for GRPO / RLOO one reward function among the rules, weighted by `rewards.model_weight`.
- `rewards.rules`: built-in rule rewards for GRPO / RLOO, each a mapping with a `type`:
    regex   {pattern}             1 if the pattern occurs in the completion, else 0
    format  {pattern}             1 if the whole completion (stripped) matches the pattern, else 0
                                  (default pattern: `<think>...</think> <answer>...</answer>`)
    length  {target, unit}        1 at `target` words / characters / tokens, falling linearly
                                  to 0 at 0 and at twice the target
    answer  {column}              1 if the record's reference answer (the `column` field of a
                                  `prompt` record, default `answer`) occurs in the completion
  and an optional `weight` (default 1.0) and `name` (the name it is logged under,
  `rewards/<name>/mean`; default its type). TRL sums the weighted rewards.

Rules are plain Python over the completion text: no code from the recipe is ever executed.
"""

from __future__ import annotations

import re

# The section's schema and checks live with the recipe schema (config imports nothing of ours).
from finetune.config.rewards import (  # noqa: F401
    COMMON_KEYS,
    DEFAULT_FORMAT,
    LENGTH_UNITS,
    RL_STAGES,
    RULES,
    RewardsSection,
    check,
)

# ----------------------------------------------------------------------------- reward functions


def text_of(completion) -> str:
    """A completion as TRL passes it: a string, or a list of messages (conversational)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


def rule_function(rule: dict):
    """A TRL reward function (completions, **columns) -> list[float] for one checked rule."""
    kind = rule["type"]
    _, optional = RULES[kind]
    opts = {**optional, **{k: v for k, v in rule.items() if k in optional or k in RULES[kind][0]}}

    if kind in ("regex", "format"):
        pattern = re.compile(opts["pattern"], re.DOTALL)
        test = pattern.search if kind == "regex" else pattern.fullmatch

        def score(completions, **_):
            return [1.0 if test(text_of(c).strip()) else 0.0 for c in completions]
    elif kind == "length":
        target, unit = opts["target"], opts["unit"]

        def size(completion, ids) -> int:
            text = text_of(completion)
            return len(ids) if unit == "tokens" else len(text.split()) if unit == "words" else len(text.strip())

        def score(completions, completion_ids=None, **_):
            ids = completion_ids or [()] * len(completions)
            return [max(0.0, 1.0 - abs(size(c, i) - target) / target) for c, i in zip(completions, ids)]
    else:  # answer
        column = opts["column"]

        def score(completions, **columns):
            if column not in columns:
                raise KeyError(f"an answer reward reads the `{column}` field of each record, and the data has none")
            refs = columns[column]
            return [
                1.0 if str(ref).strip().casefold() in text_of(c).casefold() else 0.0
                for c, ref in zip(completions, refs)
            ]

    score.__name__ = rule.get("name") or kind  # TRL logs rewards/<name>/mean
    return score


def load_recipe_reward_model(recipe):
    """(model, tokenizer) of `rewards.model` (finetune.loading.load_reward_model: merged, frozen) in
    the recipe's model dtype; a dir that is not a reward model is an error naming the field."""
    from finetune import loading
    from finetune.errors import RecipeError

    try:
        return loading.load_reward_model(recipe.rewards.model, dtype=loading.resolve_dtype(recipe.model.dtype))
    except RecipeError as e:
        raise RecipeError(f"rewards.model: {e}") from None


def reward_functions(recipe) -> tuple[list, list, list[float]]:
    """(reward_funcs, reward_processing_classes, weights) for GRPOTrainer / RLOOTrainer."""
    funcs, tokenizers, weights = [], [], []
    for rule in recipe.rewards.rules:
        funcs.append(rule_function(rule))
        tokenizers.append(None)
        weights.append(float(rule.get("weight", 1.0)))
    if recipe.rewards.model is not None:
        model, tok = load_recipe_reward_model(recipe)
        model.config.name_or_path = "reward_model"  # TRL logs a model reward under this name
        funcs.append(model)
        tokenizers.append(tok)
        weights.append(float(recipe.rewards.model_weight))
    return funcs, tokenizers, weights


def describe(rewards: RewardsSection) -> list[str]:
    """One line per reward, for the model card and logs."""
    lines = []
    for rule in rewards.rules:
        opts = ", ".join(f"{k}={v!r}" for k, v in rule.items() if k not in ("type", "weight", "name"))
        lines.append(
            f"`{rule.get('name') or rule['type']}`: {rule['type']} rule ({opts}), "
            f"weight {float(rule.get('weight', 1.0)):g}"
        )
    if rewards.model is not None:
        lines.append(f"`reward_model`: the reward model in `{rewards.model}`, weight {rewards.model_weight:g}")
    return lines


def card_section(recipe) -> str:
    """The model card's `## Rewards` section of an RL stage ('' for other stages)."""
    if recipe.stage not in RL_STAGES:
        return ""
    if recipe.stage == "ppo":
        body = (
            f"- reward model: `{recipe.rewards.model}`; the value model started as a copy of it\n"
            "- reference: the policy with its adapter disabled (the base it started from)\n"
            "- **experimental**: PPO runs on `trl.experimental.ppo.PPOTrainer` (TRL marks it experimental; "
            "removed after TRL 1.12)\n"
        )
    else:
        body = "".join(f"- {line}\n" for line in describe(recipe.rewards))
    return f"## Rewards\n{body}- per-step reward, KL and entropy: `log_history` in `trainer_state.json`\n\n"


def card_data(recipe, stats: dict) -> str:
    """The model card's description of an RL stage's training data ('' for other stages)."""
    if recipe.stage not in RL_STAGES:
        return ""
    about = "about " if stats.get("sampled") else ""
    return (
        f"{stats['examples']} prompts ({about}{stats['tokens']} tokens); the completions are sampled during training"
    )


def trend(log_history: list[dict], key: str, name: str, n: int = 5) -> dict:
    """Mean of `key` over the first and the last `n` logged steps, as {name}_first{n} / {name}_last{n}."""
    values = [h[key] for h in log_history if key in h]
    if not values:
        return {}
    n = max(1, min(n, len(values) // 2))
    return {f"{name}_first{n}": sum(values[:n]) / n, f"{name}_last{n}": sum(values[-n:]) / n}


# Per RL stage: logged value -> the name of its first-vs-last trend in the metrics and the card.
_GROUP_TRENDS = {"reward": "reward", "kl": "kl", "entropy": "entropy"}
TREND_KEYS = {
    "ppo": {"objective/scores": "reward", "objective/kl": "kl", "objective/entropy": "entropy"},
    "grpo": _GROUP_TRENDS,
    "rloo": _GROUP_TRENDS,
}


def trend_metrics(stage: str, log_history: list[dict]) -> dict:
    out = {}
    for key, name in TREND_KEYS.get(stage, {}).items():
        out.update(trend(log_history, key, name))
    return out
