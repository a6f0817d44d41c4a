"""Text-generation metrics: the numbers behind `metrics.json`.

Default style (`standard`): what the reference implementations compute on the same strings.
- BLEU: `sacrebleu` corpus BLEU and the mean of `sacrebleu` sentence BLEU, with sacrebleu's `13a`
  tokenizer for English and `zh` (every CJK character a token, the rest as 13a) for Chinese.
- ROUGE-1/2/L/Lsum F1: `rouge-score`'s scorer (no stemming), averaged over examples. Its default
  tokenizer drops every non-ASCII character, so Chinese would score 0: we pass a tokenizer that
  keeps CJK characters as single tokens (`chars`, the default: no segmentation dictionary, so the
  numbers do not depend on one) or jieba words (`jieba`). For English text `chars` gives exactly
  rouge-score's own tokens.
- exact match: the share of predictions equal to their reference after stripping whitespace.

`llamafactory` style reproduces LLaMA-Factory's `ComputeSimilarity` (src/llamafactory/train/sft/
metric.py) for users comparing against its numbers: BLEU-4 is nltk `sentence_bleu` with
smoothing method3 over *characters* (English too, spaces included), averaged per sentence;
ROUGE-1/2/L are `rouge_chinese` F-scores over jieba words (computed by rouge_chinese itself, as
LLaMA-Factory calls it: n-grams counted as sets). Both are
x100 and rounded to 4 decimals per example, as there. These numbers are not comparable with
sacrebleu/rouge-score ones (character 4-grams are far easier to match than word 4-grams).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence

LANGUAGES = ("auto", "en", "zh")
ROUGE_TOKENIZERS = ("chars", "jieba")
STYLES = ("standard", "llamafactory")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

CJK = re.compile(
    r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]"
)  # a CJK ideograph: the one definition
_CHARS_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]|[a-z0-9]+")


def detect_language(texts: Iterable[str]) -> str:
    """`zh` if any text has a CJK character, else `en`. sacrebleu's `zh` tokenizer treats non-CJK
    text exactly as `13a` does, so mixed English/Chinese data loses nothing by this rule."""
    return "zh" if any(CJK.search(t) for t in texts) else "en"


def bleu_tokenize_name(language: str) -> str:
    return {"en": "13a", "zh": "zh"}[language]


class CharsTokenizer:
    """rouge-score tokenizer: lower-cased ASCII words and digits (as rouge-score's default) plus
    every CJK character as its own token; everything else separates tokens."""

    def tokenize(self, text: str) -> list[str]:
        return _CHARS_TOKEN.findall(text.lower())


def quiet_jieba():
    """jieba, without its "Building prefix dict ... Loading model cost" lines on stderr."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


class JiebaTokenizer:
    """rouge-score tokenizer: jieba words, lower-cased, whitespace/punctuation-only words dropped."""

    def tokenize(self, text: str) -> list[str]:
        jieba = quiet_jieba()
        return [w for w in (w.strip().lower() for w in jieba.lcut(text)) if w and re.search(r"\w", w)]


def rouge_tokenizer(name: str):
    return {"chars": CharsTokenizer, "jieba": JiebaTokenizer}[name]()


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0


def bleu(predictions: Sequence[str], references: Sequence[str], language: str) -> dict[str, float]:
    """sacrebleu corpus BLEU and mean sentence BLEU (0-100)."""
    import sacrebleu

    tok = bleu_tokenize_name(language)
    corpus = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tok)
    sentence = [sacrebleu.sentence_bleu(p, [r], tokenize=tok).score for p, r in zip(predictions, references)]
    return {"bleu": corpus.score, "sentence_bleu": _mean(sentence)}


def rouge(predictions: Sequence[str], references: Sequence[str], tokenizer: str = "chars") -> dict[str, float]:
    """rouge-score F1 (0-1) per type, averaged over examples."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=rouge_tokenizer(tokenizer))
    per = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {t: _mean([s[t].fmeasure for s in per]) for t in ROUGE_TYPES}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {"exact_match": _mean([float(p.strip() == r.strip()) for p, r in zip(predictions, references)])}


# ----------------------------------------------------------------------------- LLaMA-Factory style


def llamafactory(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """LLaMA-Factory's `rouge-1`, `rouge-2`, `rouge-l`, `bleu-4` (0-100, per-example rounded, averaged)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = quiet_jieba()
    scores: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(predictions, references):
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        if not " ".join(hypothesis).split() or not " ".join(reference).split():
            result = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
        else:
            result = {k: v["f"] for k, v in Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0].items()}
        for k, v in result.items():
            scores[k].append(round(v * 100, 4))
        b = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(b * 100, 4))
    return {k: _mean(v) for k, v in scores.items()}


def compute(
    predictions: Sequence[str],
    references: Sequence[str],
    language: str = "auto",
    style: str = "standard",
    rouge_tokenizer_name: str = "chars",
) -> dict[str, float]:
    """Every metric of a style in one flat dict (plus `language`, `n`), computed directly."""
    language = detect_language(references) if language == "auto" else language
    if style == "llamafactory":
        out = llamafactory(predictions, references)
    else:
        out = {**bleu(predictions, references, language), **rouge(predictions, references, rouge_tokenizer_name)}
    out.update(exact_match(predictions, references))
    return out
