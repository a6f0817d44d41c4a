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
from dataclasses import dataclass, field

RL_STAGES = ("ppo", "grpo", "rloo")
DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
LENGTH_UNITS = ("words", "chars", "tokens")
# type -> (required keys, optional keys with defaults)
RULES = {
    "regex": ({"pattern"}, {}),
    "format": (set(), {"pattern": DEFAULT_FORMAT}),
    "length": ({"target"}, {"unit": "words"}),
    "answer": (set(), {"column": "answer"}),
}
COMMON_KEYS = {"weight": 1.0, "name": None}


@dataclass
class RewardsSection:
    model: str | None = field(default=None, metadata={"help": (
        "An `rm` output dir scoring completions: ppo's reward model (its value model starts from it); "
        "for grpo/rloo one reward function, added to `rules`.")})
    model_weight: float = field(default=1.0, metadata={"help": "grpo/rloo: weight of the reward model's score."})
    rules: list[dict] = field(default_factory=list, metadata={"help": (
        "grpo/rloo: built-in rule rewards, each a mapping {type, weight, ...}; types regex, format, "
        "length, answer (README: Rewards for RL).")})

    def is_default(self) -> bool:
        return self.model is None and self.model_weight == 1.0 and not self.rules


def check(stage: str, rewards: RewardsSection, where) -> None:
    """Raise RecipeError for a `rewards` section the stage cannot use; `where(path)` names the place."""
    from finetune.errors import RecipeError

    if stage not in RL_STAGES:
        if not rewards.is_default():
            raise RecipeError(f"{where(('rewards',))}: only the {', '.join(RL_STAGES)} stages use rewards (stage is {stage})")
        return
    if stage == "ppo":
        if rewards.model is None:
            raise RecipeError(f"{where(('rewards', 'model'))}: ppo needs a reward model: the output dir of an rm stage")
        if rewards.rules:
            raise RecipeError(f"{where(('rewards', 'rules'))}: ppo scores with the reward model only; "
                              "rule rewards are for grpo and rloo")
    elif rewards.model is None and not rewards.rules:
        raise RecipeError(f"{where(('rewards',))}: {stage} needs rewards.model (an rm output dir) and/or rewards.rules")
    names = []
    for i, rule in enumerate(rewards.rules):
        names.append(_check_rule(rule, lambda key, i=i: where(("rewards", "rules")) + f"[{i}]" + (f".{key}" if key else "")))
    if rewards.model is not None:
        names.append("reward_model")
    for name in names:
        if names.count(name) > 1:
            raise RecipeError(f"{where(('rewards', 'rules'))}: two rewards are named {name!r}; give them distinct `name`s")


def _check_rule(rule, where) -> str:
    from finetune.errors import RecipeError, closest

    if not isinstance(rule, dict):
        raise RecipeError(f"{where('')}: expected a mapping like {{type: regex, pattern: ..., weight: 1.0}}, got {rule!r}")
    kind = rule.get("type")
    if kind not in RULES:
        hint = closest(str(kind), RULES) if kind is not None else ""
        raise RecipeError(f"{where('type')}: {kind!r} is not one of {', '.join(RULES)}{hint}")
    required, optional = RULES[kind]
    allowed = {"type", *required, *optional, *COMMON_KEYS}
    for key in rule:
        if key not in allowed:
            raise RecipeError(f"{where(key)}: unknown key for a {kind} reward{closest(str(key), allowed)} "
                              f"(keys: {', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in rule:
            raise RecipeError(f"{where(key)}: missing (a {kind} reward needs {', '.join(sorted(required))})")
    weight = rule.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RecipeError(f"{where('weight')}: expected a number, got {weight!r}")
    if "pattern" in rule:
        if not isinstance(rule["pattern"], str) or not rule["pattern"]:
            raise RecipeError(f"{where('pattern')}: expected a non-empty regular expression string")
        try:
            re.compile(rule["pattern"])
        except re.error as e:
            raise RecipeError(f"{where('pattern')}: invalid regular expression: {e}") from None
    if kind == "length":
        target = rule["target"]
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise RecipeError(f"{where('target')}: expected a positive whole number, got {target!r}")
        if rule.get("unit", "words") not in LENGTH_UNITS:
            raise RecipeError(f"{where('unit')}: {rule['unit']!r} is not one of {', '.join(LENGTH_UNITS)}")
    if kind == "answer" and not isinstance(rule.get("column", "answer"), str):
        raise RecipeError(f"{where('column')}: expected a column name")
    name = rule.get("name") or kind
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise RecipeError(f"{where('name')}: expected a name of letters, digits, _ . -, got {name!r}")
    return name


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
            return [1.0 if str(ref).strip().casefold() in text_of(c).casefold() else 0.0 for c, ref in zip(completions, refs)]

    score.__name__ = rule.get("name") or kind  # TRL logs rewards/<name>/mean
    return score


def load_model(recipe):
    """(model, tokenizer) of `rewards.model` (finetune.chain.load_reward_model: merged, frozen) in
    the recipe's model dtype; a dir that is not a reward model is an error naming the field."""
    from finetune import chain, models
    from finetune.errors import RecipeError

    try:
        return chain.load_reward_model(recipe.rewards.model, dtype=models.resolve_dtype(recipe.model.dtype))
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
        model, tok = load_model(recipe)
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
        lines.append(f"`{rule.get('name') or rule['type']}`: {rule['type']} rule ({opts}), weight {float(rule.get('weight', 1.0)):g}")
    if rewards.model is not None:
        lines.append(f"`reward_model`: the reward model in `{rewards.model}`, weight {rewards.model_weight:g}")
    return lines


def card_section(recipe) -> str:
    """The model card's `## Rewards` section of an RL stage ('' for other stages)."""
    if recipe.stage not in RL_STAGES:
        return ""
    if recipe.stage == "ppo":
        body = (f"- reward model: `{recipe.rewards.model}`; the value model started as a copy of it\n"
                "- reference: the policy with its adapter disabled (the base it started from)\n"
                "- **experimental**: PPO runs on `trl.experimental.ppo.PPOTrainer` (TRL marks it experimental; "
                "removed after TRL 1.12)\n")
    else:
        body = "".join(f"- {line}\n" for line in describe(recipe.rewards))
    return f"## Rewards\n{body}- per-step reward, KL and entropy: `log_history` in `trainer_state.json`\n\n"


def card_data(recipe, stats: dict) -> str:
    """The model card's description of an RL stage's training data ('' for other stages)."""
    if recipe.stage not in RL_STAGES:
        return ""
    return f"{stats['examples']} prompts ({stats['tokens']} tokens); the completions are sampled during training"


def trend(log_history: list[dict], key: str, name: str, n: int = 5) -> dict:
    """Mean of `key` over the first and the last `n` logged steps, as {name}_first{n} / {name}_last{n}."""
    values = [h[key] for h in log_history if key in h]
    if not values:
        return {}
    n = max(1, min(n, len(values) // 2))
    return {f"{name}_first{n}": sum(values[:n]) / n, f"{name}_last{n}": sum(values[-n:]) / n}


# Per RL stage: logged value -> the name of its first-vs-last trend in the metrics and the card.
_GROUP_TRENDS = {"reward": "reward", "kl": "kl", "entropy": "entropy"}
TREND_KEYS = {"ppo": {"objective/scores": "reward", "objective/kl": "kl", "objective/entropy": "entropy"},
              "grpo": _GROUP_TRENDS, "rloo": _GROUP_TRENDS}


def trend_metrics(stage: str, log_history: list[dict]) -> dict:
    out = {}
    for key, name in TREND_KEYS.get(stage, {}).items():
        out.update(trend(log_history, key, name))
    return out
