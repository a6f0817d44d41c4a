"""Regenerate the demo preference datasets in data/ (deterministic, fixed seed):

    python data/tools/make_preference_demo.py      # rewrites the three files, prints row counts

The preference is a toy a tiny model can learn: every chosen answer is polite and complete
("Sure! <correct answer> Hope this helps." / "好的！<正确答案>希望对你有帮助。"); every rejected
answer is one of three bad kinds, in turn: a rude refusal, a curt wrong answer, or the correct
answer cut off half-way. Questions are arithmetic and capital cities, in English and Chinese.

- preference_en_demo.jsonl  `preference`, explicit prompt, plain strings
- preference_zh_demo.jsonl  `preference`, implicit prompt: chosen/rejected are whole chats sharing the user turn
- kto_demo.jsonl            `kto`, unpaired (prompt, completion, label), English and Chinese
After changing row counts, update the table in data/README.md (tests/test_demo_data.py checks it).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables as T  # noqa: E402

DATA = Path(__file__).resolve().parent.parent
SEED = 20240602

RUDE_EN = ["Figure it out yourself.", "Ask someone else.", "Not my problem.", "Why would I tell you?"]
RUDE_ZH = ["自己算吧，别问我。", "问别人去。", "这跟我没关系。", "我不想回答。"]


def questions(rng: random.Random, lang: str, n: int) -> list[tuple[str, str, str]]:
    """n distinct (question, correct answer, wrong answer) in `lang`."""
    out, seen = [], set()
    countries = T.COUNTRIES
    while len(out) < n:
        kind = rng.choice(["add", "add", "mul", "capital"])
        if kind == "capital":
            i, j = rng.sample(range(len(countries)), 2)
            c, other = countries[i], countries[j]
            key = ("capital", i)
            if lang == "en":
                item = (f"What is the capital of {c[0]}?", f"The capital of {c[0]} is {c[1]}.", f"It is {other[1]}.")
            else:
                item = (f"{c[5]}的首都是哪里？", f"{c[5]}的首都是{c[6]}。", f"是{other[6]}。")
        else:
            a, b = (
                (rng.randint(11, 99), rng.randint(11, 99))
                if kind == "add"
                else (rng.randint(3, 15), rng.randint(3, 12))
            )
            right = a + b if kind == "add" else a * b
            wrong = right + rng.choice([-11, -3, -1, 1, 2, 10])
            key = (kind, a, b)
            if lang == "en":
                op = "plus" if kind == "add" else "times"
                item = (f"What is {a} {op} {b}?", f"{a} {op} {b} is {right}.", f"{wrong}.")
            else:
                op = "加" if kind == "add" else "乘以"
                item = (f"{a}{op}{b}等于多少？", f"{a}{op}{b}等于{right}。", f"{wrong}。")
        if key in seen:
            continue
        seen.add(key)
        out.append(item)
    return out


def pair(rng: random.Random, lang: str, i: int, answer: str, wrong: str) -> tuple[str, str]:
    if lang == "en":
        chosen = f"Sure! {answer} Hope this helps."
        words = answer.split()
        bad = [rng.choice(RUDE_EN), wrong, " ".join(words[: max(1, len(words) // 2)])]
    else:
        chosen = f"好的！{answer}希望对你有帮助。"
        # cut after 等于 / 是, before the value (a cut inside a word gives tokens the tiny corpus lacks)
        cut = "等于" if "等于" in answer else "是"
        bad = [rng.choice(RUDE_ZH), wrong, answer[: answer.index(cut) + len(cut)]]
    return chosen, bad[i % 3]


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    en, zh, kto = [], [], []
    for i, (q, a, w) in enumerate(questions(rng, "en", 160)):
        chosen, rejected = pair(rng, "en", i, a, w)
        en.append({"prompt": q, "chosen": chosen, "rejected": rejected})
    for i, (q, a, w) in enumerate(questions(rng, "zh", 120)):
        chosen, rejected = pair(rng, "zh", i, a, w)
        user = {"role": "user", "content": q}
        zh.append(
            {
                "chosen": [user, {"role": "assistant", "content": chosen}],
                "rejected": [user, {"role": "assistant", "content": rejected}],
            }
        )
    for lang, n in (("en", 60), ("zh", 40)):
        for i, (q, a, w) in enumerate(questions(random.Random(SEED + len(lang) + n), lang, n)):
            chosen, rejected = pair(rng, lang, i, a, w)
            good = i % 2 == 0  # balanced labels; one completion per prompt
            kto.append({"prompt": q, "completion": chosen if good else rejected, "label": good})
    random.Random(SEED).shuffle(kto)
    return {"preference_en_demo.jsonl": en, "preference_zh_demo.jsonl": zh, "kto_demo.jsonl": kto}


def main() -> None:
    for name, rows in build().items():
        (DATA / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
