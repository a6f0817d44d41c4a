"""The `distill:` recipe section's schema and checks (knowledge distillation, `stage: distill`).

The stage itself is `finetune/stages/distill.py`; the schema lives here so that `finetune.config`
validates a whole recipe without importing it (config imports nothing else of ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from finetune.errors import RecipeError

DISTILL_METHODS = ("logits", "sequences", "on_policy")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DistillSection:
    teacher: str | None = _f(
        None,
        help="The teacher: a model dir, hub id or tiny name, or a finetune output dir (an adapter, QLoRA or "
        "chained stage: loaded on its base as it was trained). In a pipeline: ${STAGE}.",
    )
    method: Literal[DISTILL_METHODS] = _f(
        "logits",
        help="logits: learn the teacher's token distributions on the data's answers (same vocabulary); "
        "sequences: SFT on the teacher's generated answers (any vocabulary); on_policy: TRL's GKD, the "
        "student's own samples scored by the teacher (same vocabulary).",
    )
    alpha: float = _f(0.5, help="logits: loss = alpha * divergence + (1 - alpha) * cross-entropy on the labels.")
    temperature: float = _f(
        1.0,
        help="logits: both distributions are softened by it before the divergence (no T^2 factor, as TRL's GKD); "
        "on_policy: the sampling temperature of the student's answers (TRL's GKD).",
    )
    beta: float = _f(
        0.0,
        help="The divergence, as TRL's GKD defines it: 0 = forward KL(teacher ‖ student), 1 = reverse "
        "KL(student ‖ teacher), in between = generalized Jensen-Shannon with that weight.",
    )
    top_k: int | None = _f(
        None,
        help="logits: keep the teacher's top-k log-probabilities per answer token, computed once into the "
        "prepared-data cache (a second run or another student does not run the teacher); the rest of the "
        "vocabulary is one bucket. null = the full distribution, the teacher running at every step.",
    )
    lmbda: float = _f(0.5, help="on_policy: fraction of steps trained on the student's own samples (TRL's lmbda).")
    max_new_tokens: int = _f(256, help="sequences: longest teacher answer; on_policy: longest student sample.")
    batch_size: int = _f(8, help="Sequences per teacher batch: sequences' generation, logits' top-k pass.")

    def given(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


# Keys each method reads beyond teacher and method (a key given for another method is an error).
METHOD_KEYS = {
    "logits": {"alpha", "temperature", "beta", "top_k", "batch_size"},
    "sequences": {"max_new_tokens", "batch_size"},  # greedy answers (finetune.eval.generation)
    "on_policy": {"temperature", "beta", "lmbda", "max_new_tokens"},
}


def check(stage: str, distill: DistillSection, where, origins: dict) -> None:
    """Raise RecipeError for a `distill` section the recipe cannot use; `where(path)` names the place."""
    given = [k for k in (f.name for f in fields(distill)) if origins.get(f"distill.{k}") in ("recipe", "override")]
    if stage != "distill":
        if given:
            raise RecipeError(f"{where(('distill', given[0]))}: only stage distill uses the distill section")
        return
    if not distill.teacher:
        raise RecipeError(
            f"{where(('distill', 'teacher'))}: missing: the teacher (a model dir, hub id, tiny name or an output dir)"
        )
    for key in ("alpha", "beta", "lmbda"):
        value = getattr(distill, key)
        if not 0.0 <= value <= 1.0:
            raise RecipeError(f"{where(('distill', key))}: must be in [0, 1], got {value}")
    if distill.temperature <= 0:
        raise RecipeError(f"{where(('distill', 'temperature'))}: must be positive, got {distill.temperature}")
    for key in ("top_k", "max_new_tokens", "batch_size"):
        value = getattr(distill, key)
        if value is not None and value < 1:
            raise RecipeError(f"{where(('distill', key))}: must be at least 1, got {value}")
    reads = METHOD_KEYS[distill.method] | {"teacher", "method"}
    for key in given:
        if key not in reads:
            raise RecipeError(
                f"{where(('distill', key))}: method {distill.method} does not use {key} "
                f"(it reads {', '.join(sorted(reads - {'teacher', 'method'}))})"
            )
