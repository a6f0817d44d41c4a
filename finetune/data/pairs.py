"""The data of the stages after SFT: preference pairs (rm, dpo, orpo, cpo, simpo), KTO examples
and prompts (ppo, grpo, rloo), as untokenised conversational datasets the TRL trainers tokenise.

`load(cfg, tok, stage)` mirrors `finetune.data.load` (same sources, formats, eval split,
errors); the splits also give token statistics for the dry-run plan and the model card.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from finetune.config import RL_STAGES, DataSection, check_stage_format
from finetune.data import PreparedData, read_examples
from finetune.data.preference import PAIR_FORMATS, prompt_only, unpair
from finetune.errors import DataError

STATS_SAMPLE = 4000  # token statistics of a bigger split are estimated from this many examples


@dataclass
class ExampleSplit:
    """Canonical examples of one split (pairs, KTO examples or prompts)."""

    source: str
    examples: list[dict]
    n_records: int
    tok: object = field(default=None, repr=False)
    n_dropped: int = 0  # set by a stage whose trainer drops examples (RewardTrainer: longer than max_length)
    _lengths: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def encoded(self) -> list[dict]:  # what TrainPlan counts
        return self.examples

    def dataset(self):
        import datasets

        return datasets.Dataset.from_list(self.examples)

    def lengths(self) -> list[tuple[int, int]]:
        """(tokens in the longest sequence the example makes, answer tokens) per example, for at most
        STATS_SAMPLE examples (a seeded sample of a bigger split: rendering and tokenizing every pair
        of a million-row set would take minutes before training starts; the trainer tokenizes them
        all anyway, in parallel). Computed once."""
        if self._lengths is None:
            examples = self.examples
            if len(examples) > STATS_SAMPLE:
                examples = [examples[i] for i in sorted(random.Random(0).sample(range(len(examples)), STATS_SAMPLE))]
            self._lengths = []
            for e in examples:
                prompt = _n_tokens(self.tok, e["prompt"], generation_prompt=True)
                answers = [e[k] for k in ("chosen", "rejected", "completion") if k in e]
                full = [_n_tokens(self.tok, e["prompt"] + a) for a in answers] or [prompt]
                self._lengths.append((max(full), sum(n - prompt for n in full)))
        return self._lengths

    def stats(self) -> dict:
        """Token statistics; for a split of more than STATS_SAMPLE examples, `sampled` says how many
        they are estimated from (totals scaled up; min, max and percentiles those of the sample)."""
        lengths = self.lengths()
        seq = sorted(n for n, _ in lengths)
        scale = len(self.examples) / len(lengths)

        def pct(p):
            return seq[min(len(seq) - 1, int(p * len(seq)))]

        return {
            "examples": len(self.examples),
            "records": self.n_records,
            "dropped": self.n_dropped,
            "tokens": round(sum(seq) * scale),
            "trained_tokens": round(sum(a for _, a in lengths) * scale),
            "length_min": seq[0],
            "length_mean": round(statistics.fmean(seq), 1),
            "length_p50": pct(0.5),
            "length_p95": pct(0.95),
            "length_max": seq[-1],
            "sampled": len(lengths) if scale > 1 else 0,
        }


def _n_tokens(tok, messages, generation_prompt=False) -> int:
    if isinstance(messages, str):  # a raw-text prompt (prompt_completion data for an RL stage)
        return len(tok(messages)["input_ids"])
    return len(
        tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)[
            "input_ids"
        ]
    )


def _shape(examples: list[dict], fmt: str, stage: str) -> list[dict]:
    """Examples of format `fmt` -> what `stage` trains on."""
    if stage in RL_STAGES:
        return [prompt_only(e) for e in examples]
    if stage == "kto" and fmt in PAIR_FORMATS:
        return unpair(examples)
    return examples


def _read(name: str, cfg: DataSection, stage: str, field_name: str):
    examples, fmt, src = read_examples(name, cfg, field_name=field_name)
    check_stage_format(stage, fmt, lambda: f"{src.label()}: data.format")
    return examples, fmt, src


def load(cfg: DataSection, tok, stage: str, seed: int = 42) -> PreparedData:
    examples, fmt, src = _read(cfg.train, cfg, stage, "data.train")
    label = src.label()
    eval_split = None
    if cfg.eval:
        eval_examples, eval_fmt, eval_src = _read(cfg.eval, cfg, stage, "data.eval")
        eval_split = ExampleSplit(eval_src.label(), _shape(eval_examples, eval_fmt, stage), len(eval_examples), tok)
    elif cfg.eval_ratio:
        n = len(examples)
        n_eval = max(1, round(n * cfg.eval_ratio))
        if n_eval >= n:
            raise DataError(f"data.eval_ratio: {cfg.eval_ratio} of {n} records leaves nothing to train on")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        held = set(order[:n_eval])
        held_out = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
        eval_split = ExampleSplit(f"{label} (held out {cfg.eval_ratio:g})", _shape(held_out, fmt, stage), n_eval, tok)
    train = ExampleSplit(label, _shape(examples, fmt, stage), len(examples), tok)
    return PreparedData(train=train, eval=eval_split, format=fmt, language=src.language)
