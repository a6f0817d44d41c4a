"""The `rewards:` recipe section's schema and checks (what the RL stages score completions with).

The section is documented in `finetune/rewards.py`, which builds the reward functions from it;
its schema lives here so that `finetune.config` validates a whole recipe without importing the
modules that use it (config imports nothing else of ours).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from finetune.errors import RecipeError, closest

RL_STAGES = ("ppo", "grpo", "rloo")  # online RL: prompts in, completions generated and scored
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
    model: str | None = field(
        default=None,
        metadata={
            "help": (
                "An `rm` output dir scoring completions: ppo's reward model (its value model starts from it); "
                "for grpo/rloo one reward function, added to `rules`."
            )
        },
    )
    model_weight: float = field(default=1.0, metadata={"help": "grpo/rloo: weight of the reward model's score."})
    rules: list[dict] = field(
        default_factory=list,
        metadata={
            "help": (
                "grpo/rloo: built-in rule rewards, each a mapping {type, weight, ...}; types regex, format, "
                "length, answer (README: Rewards for RL)."
            )
        },
    )

    def is_default(self) -> bool:
        return self.model is None and self.model_weight == 1.0 and not self.rules


def check(stage: str, rewards: RewardsSection, where) -> None:
    """Raise RecipeError for a `rewards` section the stage cannot use; `where(path)` names the place."""
    if stage not in RL_STAGES:
        if not rewards.is_default():
            raise RecipeError(
                f"{where(('rewards',))}: only the {', '.join(RL_STAGES)} stages use rewards (stage is {stage})"
            )
        return
    if stage == "ppo":
        if rewards.model is None:
            raise RecipeError(
                f"{where(('rewards', 'model'))}: ppo needs a reward model: the output dir of an rm stage"
            )
        if rewards.rules:
            raise RecipeError(
                f"{where(('rewards', 'rules'))}: ppo scores with the reward model only; "
                "rule rewards are for grpo and rloo"
            )
    elif rewards.model is None and not rewards.rules:
        raise RecipeError(
            f"{where(('rewards',))}: {stage} needs rewards.model (an rm output dir) and/or rewards.rules"
        )
    names = []
    for i, rule in enumerate(rewards.rules):
        names.append(
            _check_rule(rule, lambda key, i=i: where(("rewards", "rules")) + f"[{i}]" + (f".{key}" if key else ""))
        )
    if rewards.model is not None:
        names.append("reward_model")
    for name in names:
        if names.count(name) > 1:
            raise RecipeError(
                f"{where(('rewards', 'rules'))}: two rewards are named {name!r}; give them distinct `name`s"
            )


def _check_rule(rule, where) -> str:
    if not isinstance(rule, dict):
        raise RecipeError(
            f"{where('')}: expected a mapping like {{type: regex, pattern: ..., weight: 1.0}}, got {rule!r}"
        )
    kind = rule.get("type")
    if kind not in RULES:
        hint = closest(str(kind), RULES) if kind is not None else ""
        raise RecipeError(f"{where('type')}: {kind!r} is not one of {', '.join(RULES)}{hint}")
    required, optional = RULES[kind]
    allowed = {"type", *required, *optional, *COMMON_KEYS}
    for key in rule:
        if key not in allowed:
            raise RecipeError(
                f"{where(key)}: unknown key for a {kind} reward{closest(str(key), allowed)} "
                f"(keys: {', '.join(sorted(allowed))})"
            )
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
