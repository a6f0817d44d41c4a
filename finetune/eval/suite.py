"""Capability suites: what a fine-tune must not lose. A suite YAML lists tasks; each task
scores one model and names the metrics the regression gate compares (see `gate.py`).

Task types (lm-evaluation-harness conventions where they apply):
- `perplexity`: held-out text, one document per line (.txt) or `{"text": ...}` (.jsonl);
  perplexity = exp(total NLL / total predicted tokens). Lower is better.
- `multiple_choice`: `{"question", "choices": [...], "answer": index}`; each choice is scored by
  the log-likelihood of `choice_prefix + choice` after the task's `template` (no chat template,
  as the harness does): `acc` = argmax log-likelihood, `acc_norm` = argmax log-likelihood per
  character of the choice (what lm-eval's code divides by).
- `instruction`: `{"prompt", "checks": {...}}` answered greedily with the chat template; checks
  `starts_with`, `contains`, `not_contains`, `max_words`, `max_chars`, `language` (en | zh);
  `check_rate` = share of checks passed, `prompt_rate` = share of prompts passing all their checks.
- `lm_eval` (extra `finetune[lm-eval]`): a task of EleutherAI's lm-evaluation-harness (`task`: a
  built-in name such as mmlu or ceval-valid when its data is reachable, or a task YAML in
  `include_path`), run on the same in-memory model; `metrics` names the harness metrics to gate.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.config import line_map, parse_yaml
from finetune.errors import DataError, RecipeError, closest
from finetune.eval.scores import CJK

TASK_TYPES = ("perplexity", "multiple_choice", "instruction", "lm_eval")
# Lower is better for these (and their tolerance is relative to the baseline); higher for the rest.
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
TASK_METRICS = {
    "perplexity": ("perplexity",),
    "multiple_choice": ("acc", "acc_norm"),
    "instruction": ("check_rate", "prompt_rate"),
}
DEFAULT_TOLERANCE = {"perplexity": 0.10, "acc": 0.10, "acc_norm": 0.10, "check_rate": 0.15, "prompt_rate": 0.20}
CHECKS = ("starts_with", "contains", "not_contains", "max_words", "max_chars", "language")
TASK_KEYS = (
    "name",
    "type",
    "data",
    "tolerance",
    "template",
    "choice_prefix",
    "max_new_tokens",
    "batch_size",
    "description",
    "task",
    "include_path",
    "metrics",
    "num_fewshot",
    "limit",
)
LM_EVAL_KEYS = ("task", "include_path", "metrics", "num_fewshot", "limit")


def direction(metric: str) -> tuple[bool, bool]:
    """(higher is better, tolerance is relative) of a metric."""
    lower = metric in LOWER_IS_BETTER
    return not lower, lower


def default_tolerance(metric: str) -> float:
    return DEFAULT_TOLERANCE.get(metric, 0.10 if metric in LOWER_IS_BETTER else 0.05)


@dataclass
class Task:
    name: str
    type: str
    data: Path | None
    tolerance: dict[str, float]
    template: str = "Question: {question}\nAnswer:"
    choice_prefix: str = " "
    max_new_tokens: int = 48
    batch_size: int = 16
    description: str = ""
    task: str = ""  # lm_eval: the harness task name
    include_path: Path | None = None  # lm_eval: a folder of task YAMLs
    lm_metrics: tuple[str, ...] = ()  # lm_eval: the harness metrics to gate
    num_fewshot: int | None = None
    limit: int | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.lm_metrics if self.type == "lm_eval" else TASK_METRICS[self.type]


@dataclass
class Suite:
    name: str
    path: Path
    tasks: list[Task] = field(default_factory=list)
    description: str = ""


def load(path: str | Path) -> Suite:
    """Parse and check a suite file; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"--suite: {path}: file not found")
    text = path.read_text(encoding="utf-8")
    raw = parse_yaml(text, str(path))
    lines = line_map(text)

    def where(*keys) -> str:
        for n in range(len(keys), 0, -1):
            if keys[:n] in lines:
                return f"{path}:{lines[keys[:n]]}: " + ".".join(
                    f"[{k}]" if isinstance(k, int) else str(k) for k in keys
                ).replace(".[", "[")
        return f"{path}: " + ".".join(map(str, keys))

    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise RecipeError(f"{path}: a suite is a mapping with a non-empty 'tasks' list")
    for key in raw:
        if key not in ("name", "description", "tasks"):
            raise RecipeError(f"{where(key)}: unknown key{closest(str(key), ['name', 'description', 'tasks'])}")
    suite = Suite(name=str(raw.get("name") or path.stem), path=path, description=str(raw.get("description") or ""))
    names = set()
    for i, t in enumerate(raw["tasks"]):
        if not isinstance(t, dict):
            raise RecipeError(f"{where('tasks', i)}: expected a mapping (name, type, data, ...)")
        for key in t:
            if key not in TASK_KEYS:
                raise RecipeError(f"{where('tasks', i, key)}: unknown key{closest(str(key), TASK_KEYS)}")
        for key in ("name", "type"):
            if not t.get(key):
                raise RecipeError(f"{where('tasks', i)}: tasks[{i}].{key}: missing")
        if t["type"] not in TASK_TYPES:
            raise RecipeError(
                f"{where('tasks', i, 'type')}: unknown task type {t['type']!r} "
                f"(one of {', '.join(TASK_TYPES)}){closest(str(t['type']), TASK_TYPES)}"
            )
        if t["name"] in names:
            raise RecipeError(f"{where('tasks', i, 'name')}: duplicate task name {t['name']!r}")
        names.add(t["name"])
        lm = t["type"] == "lm_eval"
        for key in LM_EVAL_KEYS if not lm else ("data", "template", "choice_prefix", "max_new_tokens"):
            if key in t:
                raise RecipeError(f"{where('tasks', i, key)}: not a key of a {t['type']} task")
        extra = {
            k: t[k]
            for k in (
                "template",
                "choice_prefix",
                "max_new_tokens",
                "batch_size",
                "description",
                "num_fewshot",
                "limit",
            )
            if k in t
        }
        data = None
        if lm:
            extra.update(_lm_eval_keys(t, path, functools.partial(where, "tasks", i)))
            metrics = extra["lm_metrics"]
        else:
            if not t.get("data"):
                raise RecipeError(f"{where('tasks', i)}: tasks[{i}].data: missing")
            data = (path.parent / str(t["data"])).resolve()
            if not data.is_file():
                raise RecipeError(f"{where('tasks', i, 'data')}: {data}: file not found")
            metrics = TASK_METRICS[t["type"]]
        tolerance = {m: default_tolerance(m) for m in metrics}
        for m, v in (t.get("tolerance") or {}).items():
            if m not in tolerance:
                raise RecipeError(
                    f"{where('tasks', i, 'tolerance', m)}: {t['name']} has no metric {m!r} "
                    f"(one of {', '.join(tolerance)})"
                )
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise RecipeError(f"{where('tasks', i, 'tolerance', m)}: expected a number >= 0, got {v!r}")
            tolerance[m] = float(v)
        suite.tasks.append(Task(name=str(t["name"]), type=t["type"], data=data, tolerance=tolerance, **extra))
    return suite


def _lm_eval_keys(t: dict, path: Path, where) -> dict:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(f"{where('type')}: lm_eval tasks need the lm-eval package: pip install 'finetune[lm-eval]'")
    if not t.get("task") or not isinstance(t["task"], str):
        raise RecipeError(f"{where('task')}: the lm-eval task name (e.g. mmlu, or one in include_path): missing")
    metrics = t.get("metrics") or ["acc"]
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise RecipeError(f"{where('metrics')}: expected a list of harness metric names, e.g. [acc, acc_norm]")
    out = {"task": t["task"], "lm_metrics": tuple(metrics)}
    if t.get("include_path"):
        include = (path.parent / str(t["include_path"])).resolve()
        if not include.is_dir():
            raise RecipeError(f"{where('include_path')}: {include}: no such directory")
        out["include_path"] = include
    return out


# ----------------------------------------------------------------------------- data


def _records(path: Path) -> list[tuple[str, object]]:
    """(where, record) per non-empty line: a JSON object for .jsonl, the line's text otherwise."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if path.suffix == ".jsonl":
            try:
                out.append((where, json.loads(line)))
            except ValueError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg})") from None
        else:
            out.append((where, line))
    if not out:
        raise DataError(f"{path}: empty dataset (no records)")
    return out


def _field(where: str, rec, key: str, kind):
    if not isinstance(rec, dict) or key not in rec:
        raise DataError(f"{where}: field '{key}': missing")
    if not isinstance(rec[key], kind):
        raise DataError(f"{where}: field '{key}': expected {getattr(kind, '__name__', kind)}")
    return rec[key]


# ----------------------------------------------------------------------------- scoring


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def _sequence_logprobs(
    model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[tuple[float, int]]:
    """(sum log p(continuation | context), continuation tokens) per (context ids, continuation ids)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        seqs = [c + x for c, x in batch]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            attn[r, : len(s)] = 1
        logits = model(
            input_ids=ids.to(_device(model)), attention_mask=attn.to(_device(model)), use_cache=False
        ).logits
        logp = torch.log_softmax(logits[:, -width:].float(), -1)  # prompt tuning prepends virtual-token positions
        for r, (c, x) in enumerate(batch):
            positions = torch.arange(len(c) - 1, len(c) + len(x) - 1)
            targets = torch.tensor(x)
            out.append((logp[r, positions, targets].sum().item(), len(x)))
    return out


def perplexity(model, tok, task: Task) -> dict[str, float]:
    texts = []
    for where, rec in _records(task.data):
        texts.append(_field(where, rec, "text", str) if isinstance(rec, dict) else rec)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    pairs = [
        (bos or ids[:1], (ids if bos else ids[1:]) + [tok.eos_token_id])
        for ids in (tok(t, add_special_tokens=False)["input_ids"] for t in texts)
    ]
    scored = _sequence_logprobs(model, pairs, task.batch_size)
    nll = -sum(s for s, _ in scored)
    n = sum(k for _, k in scored)
    return {"perplexity": math.exp(nll / n)}


def multiple_choice(model, tok, task: Task) -> dict[str, float]:
    questions = []
    for where, rec in _records(task.data):
        q = _field(where, rec, "question", str)
        choices = _field(where, rec, "choices", list)
        answer = _field(where, rec, "answer", int)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices': expected a list of at least 2 strings")
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: field 'answer': {answer} is not an index of choices (0..{len(choices) - 1})")
        questions.append((task.template.format(question=q), choices, answer))
    pairs, spans = [], []
    for context, choices, _ in questions:
        ctx = tok(context, add_special_tokens=True)["input_ids"]
        spans.append((len(pairs), len(choices)))
        for c in choices:  # harness: encode context + continuation together, split at the context length
            whole = tok(context + task.choice_prefix + c, add_special_tokens=True)["input_ids"]
            pairs.append((whole[: len(ctx)], whole[len(ctx) :]))
    scored = _sequence_logprobs(model, pairs, task.batch_size)
    acc = acc_norm = 0
    for (_context, choices, answer), (first, k) in zip(questions, spans):
        ll = [scored[first + j][0] for j in range(k)]
        norm = [ll[j] / len(c) for j, c in enumerate(choices)]  # the harness: per character of the choice
        acc += int(max(range(k), key=ll.__getitem__) == answer)
        acc_norm += int(max(range(k), key=norm.__getitem__) == answer)
    return {"acc": acc / len(questions), "acc_norm": acc_norm / len(questions)}


def _check(name: str, value, answer: str) -> bool:
    if name == "starts_with":
        return answer.lower().startswith(str(value).lower())
    if name == "contains":
        return str(value).lower() in answer.lower()
    if name == "not_contains":
        return str(value).lower() not in answer.lower()
    if name == "max_words":
        return len(answer.split()) <= int(value)
    if name == "max_chars":
        return len(answer) <= int(value)
    letters = [ch for ch in answer if ch.isalpha()]
    cjk = sum(1 for ch in letters if CJK.match(ch))
    share = cjk / len(letters) if letters else 0.0
    return share >= 0.5 if value == "zh" else bool(letters) and share < 0.1


def instruction(model, tok, task: Task) -> dict[str, float]:
    from finetune.eval.generation import generate

    prompts, checks = [], []
    for where, rec in _records(task.data):
        prompts.append(_field(where, rec, "prompt", str))
        c = _field(where, rec, "checks", dict)
        for name, value in c.items():
            if name not in CHECKS:
                raise DataError(
                    f"{where}: field 'checks.{name}': unknown check{closest(name, CHECKS)} "
                    f"(one of {', '.join(CHECKS)})"
                )
            if name == "language" and value not in ("en", "zh"):
                raise DataError(f"{where}: field 'checks.language': expected en or zh, got {value!r}")
        checks.append(c)
    answers = generate(
        model, tok, [[{"role": "user", "content": p}] for p in prompts], task.max_new_tokens, task.batch_size
    )
    passed = [[_check(n, v, a) for n, v in c.items()] for c, a in zip(checks, answers)]
    total = sum(len(p) for p in passed)
    return {
        "check_rate": sum(sum(p) for p in passed) / max(total, 1),
        "prompt_rate": sum(all(p) for p in passed) / len(passed),
    }


def lm_eval_task(model, tok, task: Task) -> dict[str, float]:
    """One lm-evaluation-harness task on the loaded model (its HFLM wrapper, no second load)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=task.batch_size)
    manager = TaskManager(include_path=str(task.include_path) if task.include_path else None)
    if not manager.match_tasks([task.task]):
        raise RecipeError(
            f"{task.name}: task: lm-eval has no task {task.task!r}{closest(task.task, manager.all_tasks)}"
        )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task.task],
        task_manager=manager,
        num_fewshot=task.num_fewshot,
        limit=task.limit,
        log_samples=False,
    )
    results = out["results"][task.task]
    values = {}
    for m in task.lm_metrics:
        key = next((k for k in results if k.split(",")[0] == m), None)
        if key is None:
            have = sorted(
                {k.split(",")[0] for k in results if "stderr" not in k and k not in ("alias", "name", "sample_len")}
            )
            raise RecipeError(
                f"{task.name}: metrics: lm-eval task {task.task!r} has no metric {m!r} (it has {', '.join(have)})"
            )
        values[m] = float(results[key])
    return values


SCORERS = {
    "perplexity": perplexity,
    "multiple_choice": multiple_choice,
    "instruction": instruction,
    "lm_eval": lm_eval_task,
}


def run(model, tok, suite: Suite) -> dict[str, dict[str, float]]:
    """task name -> metric -> value, for one model."""
    return {t.name: SCORERS[t.type](model, tok, t) for t in suite.tasks}


def check_data(suite: Suite) -> None:
    """Read every task's data once (cheap), so a bad record fails before any model is loaded."""
    for t in suite.tasks:
        if t.data is not None:
            _records(t.data)
