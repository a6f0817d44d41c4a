"""Our metrics equal the reference implementations called directly on the same inputs
(sacrebleu, rouge-score; LLaMA-Factory's nltk + jieba + rouge_chinese recipe), in English and
Chinese, through the shipped `evaluate` modules."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from finetune.eval import modules, scores

EN_PRED = [
    "The cat sat on the mat.",
    "A dog runs fast in the park",
    "Paris is the capital of France.",
    "It opens at 7:30 every Monday.",
    "I do not know.",
]
EN_REF = [
    "The cat is on the mat.",
    "The dog runs fast in the park.",
    "Paris is the capital of France.",
    "The shop opens at 7:30 on Mondays.",
    "Tom keeps his bike in the kitchen.",
]
ZH_PRED = [
    "中国的首都是北京。",
    "小明的猫叫花花，今年三岁。",
    "我喜欢吃苹果",
    "今天天气很好，我们去公园吧！",
    "不知道",
]
ZH_REF = [
    "中国的首都是北京。",
    "小明的猫叫花花，它今年三岁。",
    "我喜欢吃香蕉和苹果。",
    "今天的天气很好。",
    "上海是一座大城市。",
]


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """evaluate copies the metric scripts into its modules cache (under HF_HOME): a temp one here."""
    import evaluate

    cache = tmp_path_factory.mktemp("hf_modules")
    saved, evaluate.config.HF_MODULES_CACHE = evaluate.config.HF_MODULES_CACHE, cache
    modules.set_modules_dir(cache)
    yield cache
    evaluate.config.HF_MODULES_CACHE = saved


@pytest.mark.parametrize(
    "preds, refs, language, tokenize", [(EN_PRED, EN_REF, "en", "13a"), (ZH_PRED, ZH_REF, "zh", "zh")]
)
def test_bleu_equals_sacrebleu(preds, refs, language, tokenize):
    import sacrebleu

    ours = modules.score(preds, refs)
    assert ours["language"] == language  # auto-detected
    assert ours["bleu"] == sacrebleu.corpus_bleu(preds, [refs], tokenize=tokenize).score
    sentence = [sacrebleu.sentence_bleu(p, [r], tokenize=tokenize).score for p, r in zip(preds, refs)]
    assert ours["sentence_bleu"] == pytest.approx(sum(sentence) / len(sentence), abs=1e-12)
    assert 0 < ours["bleu"] < 100
    # the other tokenizer gives another number: the language choice matters
    other = sacrebleu.corpus_bleu(preds, [refs], tokenize="13a" if tokenize == "zh" else "char").score
    assert other != ours["bleu"]


@pytest.mark.parametrize("preds, refs", [(EN_PRED, EN_REF), (ZH_PRED, ZH_REF)])
@pytest.mark.parametrize("tokenizer", ["chars", "jieba"])
def test_rouge_equals_rouge_score(preds, refs, tokenizer):
    from rouge_score import rouge_scorer

    ours = modules.score(preds, refs, rouge_tokenizer=tokenizer)
    scorer = rouge_scorer.RougeScorer(
        ["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False, tokenizer=scores.rouge_tokenizer(tokenizer)
    )
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert ours[key] == pytest.approx(sum(d[key].fmeasure for d in direct) / len(direct), abs=1e-12)
        assert 0 < ours[key] < 1


def test_chars_tokenizer_is_rouge_scores_own_on_english_and_keeps_chinese():
    from rouge_score import tokenizers

    default = tokenizers.DefaultTokenizer(use_stemmer=False)
    for text in EN_PRED + EN_REF + ["Hello, WORLD! It's 3.14 -- ok?"]:
        assert scores.CharsTokenizer().tokenize(text) == default.tokenize(text)
    assert default.tokenize(ZH_REF[0]) == []  # why a Chinese-aware tokenizer is needed at all
    assert scores.CharsTokenizer().tokenize("我喜欢 Apple 3个") == ["我", "喜", "欢", "apple", "3", "个"]


def test_exact_match():
    assert modules.score(["a ", "b", "c"], ["a", "B", "c"])["exact_match"] == pytest.approx(2 / 3)


def _llamafactory_direct(preds, refs):
    """LLaMA-Factory's ComputeSimilarity loop (src/llamafactory/train/sft/metric.py), with its libraries."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.CRITICAL)
    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, refs):
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu * 100, 4))
    return {k: sum(v) / len(v) for k, v in score_dict.items()}


@pytest.mark.parametrize(
    "preds, refs",
    [
        (EN_PRED, EN_REF),
        (ZH_PRED, ZH_REF),
        (["Hello  world... ok？ fine", "", "??"], ["hello world ok fine", "x", "是"]),
    ],
)
def test_llamafactory_style_equals_llamafactory(preds, refs):
    ours = modules.score(preds, refs, style="llamafactory")
    direct = _llamafactory_direct(preds, refs)
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert ours[key] == pytest.approx(direct[key], abs=1e-9), key


def test_llamafactory_bleu_is_not_sacrebleu():
    """Character 4-grams match far more easily than word 4-grams: the two BLEUs disagree."""
    standard = modules.score(EN_PRED, EN_REF)
    lf = modules.score(EN_PRED, EN_REF, style="llamafactory")
    assert lf["bleu-4"] > standard["sentence_bleu"] + 5


def test_language_detection():
    assert scores.detect_language(["hello", "world"]) == "en"
    assert scores.detect_language(["hello", "你好"]) == "zh"
    assert modules.score(ZH_PRED, ZH_REF, language="en")["bleu"] != modules.score(ZH_PRED, ZH_REF)["bleu"]


def test_metric_modules_load_by_path_with_evaluate(tmp_path):
    """A user can load our modules with plain `evaluate.load(<folder>)` (offline), same numbers."""
    import evaluate

    bleu = evaluate.load(str(modules.path("bleu")), keep_in_memory=True, cache_dir=str(tmp_path))
    assert bleu.compute(predictions=ZH_PRED, references=ZH_REF)["bleu"] == modules.score(ZH_PRED, ZH_REF)["bleu"]


def test_modules_ship_in_the_package_data():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["finetune"]
    root = Path(scores.__file__).resolve().parents[1]
    shipped = {p for pattern in patterns for p in root.glob(pattern)}
    for name in modules.NAMES:
        assert modules.path(name) / f"{name}.py" in shipped


def test_metrics_work_when_the_hf_cache_is_read_only(tmp_path):
    """A read-only HF_HOME (shared or packaged install): the script copies go to a private temp
    dir, nothing is written under HF_HOME, and the numbers are the same. (Simulated: the test may
    run as root, for whom file modes do not stop writes.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import sacrebleu

    repo = Path(__file__).resolve().parents[1]
    hf = tmp_path / "hf"
    code = (
        "import json; from finetune.eval import modules; modules._writable = lambda d: False; "
        f"r = modules.score({EN_PRED!r}, {EN_REF!r}); print(json.dumps([modules._chosen['modules'], r['bleu']]))"
    )
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HOME": str(hf)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    modules_dir, bleu = json.loads(out.stdout.strip().splitlines()[-1])
    assert not hf.exists() and not modules_dir.startswith(str(hf))
    assert bleu == sacrebleu.corpus_bleu(EN_PRED, [EN_REF], tokenize="13a").score


def test_jieba_says_nothing_on_stderr(tmp_path):
    """jieba's "Building prefix dict ... Loading model cost" lines are not ours to print."""
    import subprocess
    import sys

    code = (
        "from finetune.eval.scores import JiebaTokenizer, llamafactory; "
        "print(JiebaTokenizer().tokenize('今天天气很好')); llamafactory(['今天很好'], ['今天天气很好'])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "天气" in r.stdout
