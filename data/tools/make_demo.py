"""Regenerate the demo datasets in data/ from the hand-written tables in tables.py.

    python data/tools/make_demo.py            # rewrites data/*.json(l), prints row counts
    python data/tools/make_demo.py --charset  # also prints the distinct non-ASCII characters

Deterministic (fixed seed): running it twice gives byte-identical files. It does not
touch data/preference_demo.jsonl, data/datasets.yaml or data/README.md; after changing
row counts, update the table in data/README.md (tests/test_demo_data.py checks it).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables as T  # noqa: E402

DATA = Path(__file__).resolve().parent.parent
SEED = 20240601


def rec(instruction, output, input="", system=None, history=None):
    r = {"instruction": instruction, "input": input, "output": output}
    if system is not None:
        r["system"] = system
    if history is not None:
        r["history"] = history
    return r


# ---------------------------------------------------------------- arithmetic

ARITH_TEMPLATES = {
    "en": {
        "add": lambda a, b, c: rec(f"What is {a} plus {b}?", f"{a} plus {b} is {c}."),
        "sub": lambda a, b, c: rec("Calculate the result.", f"{a} - {b} = {c}.", f"{a} - {b}"),
        "mul": lambda a, b, c: rec(f"What is {a} times {b}?", f"{a} times {b} is {c}."),
        "div": lambda a, b, c: rec(f"Divide {a} by {b}.", f"{a} divided by {b} is {c}."),
        "word_add": lambda a, b, c: rec(
            f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
            f"He has {a} + {b} = {c} apples now.",
        ),
        "word_sub": lambda a, b, c: rec(
            f"A bus has {a} people on it. {b} people get off. How many are left?",
            f"{a} - {b} = {c}, so {c} people are left.",
        ),
    },
    "zh": {
        "add": lambda a, b, c: rec(f"{a}加{b}等于多少？", f"{a}加{b}等于{c}。"),
        "sub": lambda a, b, c: rec("计算下面的算式。", f"{a}-{b}={c}。", f"{a}-{b}"),
        "mul": lambda a, b, c: rec(f"{a}乘以{b}是多少？", f"{a}乘以{b}等于{c}。"),
        "div": lambda a, b, c: rec(f"{a}除以{b}等于几？", f"{a}除以{b}等于{c}。"),
        "word_add": lambda a, b, c: rec(
            f"小明有{a}个苹果，又买了{b}个，现在一共有几个？", f"{a}+{b}={c}，现在一共有{c}个苹果。"
        ),
        "word_sub": lambda a, b, c: rec(
            f"车上有{a}个人，下去了{b}个人，还剩多少人？", f"{a}-{b}={c}，车上还剩{c}个人。"
        ),
    },
}


def arith(rng, n, lang):
    """n distinct arithmetic problems, worded in `lang`."""
    out, seen = [], set()
    kinds = ["add", "sub", "mul", "div", "word_add", "word_sub"]
    while len(out) < n:
        k = kinds[len(out) % len(kinds)]
        if k in ("add", "word_add"):
            a, b = rng.randint(11, 99), rng.randint(11, 99)
            c = a + b
        elif k in ("sub", "word_sub"):
            a, b = rng.randint(40, 150), rng.randint(5, 39)
            c = a - b
        elif k == "mul":
            a, b = rng.randint(3, 15), rng.randint(3, 12)
            c = a * b
        else:
            b, c = rng.randint(2, 12), rng.randint(3, 15)
            a = b * c
        if (k, a, b) in seen:
            continue
        seen.add((k, a, b))
        out.append(ARITH_TEMPLATES[lang][k](a, b, c))
    return out


def arith_en(rng, n):
    return arith(rng, n, "en")


def arith_zh(rng, n):
    return arith(rng, n, "zh")


def arith_chain_en(rng):
    a, b, d = rng.randint(5, 40), rng.randint(5, 40), rng.randint(2, 5)
    c = a + b
    e = c * d
    f = rng.randint(1, 20)
    turns = [
        (f"What is {a} plus {b}?", f"{a} plus {b} is {c}."),
        (f"Now multiply that by {d}.", f"{c} times {d} is {e}."),
    ]
    if rng.random() < 0.5:
        turns.append((f"And subtract {f}?", f"{e} minus {f} is {e - f}."))
    return turns


def arith_chain_zh(rng):
    a, b, d = rng.randint(5, 40), rng.randint(5, 40), rng.randint(2, 5)
    c = a + b
    e = c * d
    f = rng.randint(1, 20)
    turns = [(f"{a}加{b}等于多少？", f"{a}加{b}等于{c}。"), (f"再乘以{d}呢？", f"{c}乘以{d}等于{e}。")]
    if rng.random() < 0.5:
        turns.append((f"再减去{f}呢？", f"{e}减去{f}等于{e - f}。"))
    return turns


# ---------------------------------------------------------------- alpaca


def alpaca_en(rng):
    rows = [rec(q, a) for q, a in T.IDENTITY_EN]
    for i, c in enumerate(T.COUNTRIES[:12]):
        name, cap, lang, cont = c[0], c[1], c[2], c[3]
        Name = name[0].upper() + name[1:]
        kind = i % 4
        if kind == 0:
            rows.append(rec(f"What is the capital of {name}?", f"The capital of {name} is {cap}."))
        elif kind == 1:
            rows.append(rec("Name the capital city of this country.", f"{cap} is the capital of {name}.", Name))
        elif kind == 2:
            rows.append(rec(f"Which continent is {name} in?", f"{Name} is in {cont}."))
        else:
            rows.append(
                rec(f"What language do people in {name} mainly speak?", f"People in {name} mainly speak {lang}.")
            )
    def_templates = ["What is {t}?", "Define {t}.", "Explain {t} in one sentence.", "What does {t} mean?"]
    for i, (term, d, _ex) in enumerate(T.DEFS_EN[:16]):
        rows.append(rec(def_templates[i % 4].format(t=term), d))
    rows += [rec(q, a) for q, a in T.HOWTO_EN[:14]]
    rows += arith_en(rng, 14)
    for i, (en, zh) in enumerate(T.PHRASES[:12]):
        instr = (
            "Translate the following into Chinese." if i % 2 == 0 else "Translate this English phrase into Chinese."
        )
        rows.append(rec(instr, zh, en))
    for en, zh in T.PHRASES[12:16]:
        rows.append(rec("Translate the following Chinese into English.", en, zh))
    rows += [rec(i, o, x) for i, x, o in T.REWRITE_EN]
    rows += [rec(i, o, x) for i, x, o in T.CLASSIFY_EN]
    rows += [rec(q, a) for q, a in T.LISTS_EN[:12]]
    rows += [rec(q, a) for q, a in T.FACTS_EN[:12]]
    rows += [rec(q, a, system=s) for s, q, a in T.SYSTEM_EN]
    rows += [rec(q, a, history=h) for h, q, a in T.HISTORY_EN]
    return rows


def alpaca_zh(rng):
    rows = [rec(q, a) for q, a in T.IDENTITY_ZH]
    for i, c in enumerate(T.COUNTRIES[:12]):
        name, cap, lang, cont = c[5], c[6], c[7], c[8]
        kind = i % 4
        if kind == 0:
            rows.append(rec(f"{name}的首都是哪里？", f"{name}的首都是{cap}。"))
        elif kind == 1:
            rows.append(rec("说出这个国家的首都。", f"{name}的首都是{cap}。", name))
        elif kind == 2:
            rows.append(rec(f"{name}在哪个大洲？", f"{name}在{cont}。"))
        else:
            rows.append(rec(f"{name}人主要说什么语言？", f"{name}人主要说{lang}。"))
    def_templates = ["什么是{t}？", "解释一下{t}。", "用一句话说明什么是{t}。", "{t}是什么意思？"]
    for i, (term, d, _ex) in enumerate(T.DEFS_ZH[:16]):
        rows.append(rec(def_templates[i % 4].format(t=term), d))
    rows += [rec(q, a) for q, a in T.HOWTO_ZH[:14]]
    rows += arith_zh(rng, 14)
    for i, (en, zh) in enumerate(T.PHRASES[16:28]):
        instr = "把下面的句子翻译成英文。" if i % 2 == 0 else "把这句中文翻译成英语。"
        rows.append(rec(instr, en, zh))
    for en, zh in T.PHRASES[28:32]:
        rows.append(rec("把下面的英文翻译成中文。", zh, en))
    rows += [rec(i, o, x) for i, x, o in T.REWRITE_ZH]
    rows += [rec(i, o, x) for i, x, o in T.CLASSIFY_ZH]
    rows += [rec(q, a) for q, a in T.LISTS_ZH[:12]]
    rows += [rec(q, a) for q, a in T.FACTS_ZH[:12]]
    rows += [rec(q, a, system=s) for s, q, a in T.SYSTEM_ZH]
    rows += [rec(q, a, history=h) for h, q, a in T.HISTORY_ZH]
    return rows


# ---------------------------------------------------------------- chats


def country_chat_en(c):
    name, cap, lang, _cont, note = c[:5]
    return [
        (f"What is the capital of {name}?", f"The capital of {name} is {cap}."),
        ("What language do people speak there?", f"People in {name} mainly speak {lang}."),
        ("Tell me one more thing about it.", note),
    ]


def country_chat_zh(c):
    name, cap, lang, _cont, note = c[5:]
    return [
        (f"{name}的首都是哪里？", f"{name}的首都是{cap}。"),
        ("那里的人说什么语言？", f"{name}人主要说{lang}。"),
        ("再说一点关于它的事吧。", note),
    ]


def animal_chat_en(a, third):
    plural, desc, food, habitat = a[:4]
    turns = [(f"Tell me about {plural.lower()}.", desc), ("What do they eat?", f"{plural} eat mostly {food}.")]
    if third:
        turns.append(("Where do they live?", f"They live in {habitat}."))
    return turns


def animal_chat_zh(a, third):
    name, desc, food, habitat = a[4:]
    turns = [(f"给我讲讲{name}。", desc), ("它吃什么？", f"{name}主要吃{food}。")]
    if third:
        turns.append(("它住在哪里？", f"它生活在{habitat}。"))
    return turns


def def_chat_en(d):
    term, definition, example = d
    return [(f"What is {term}?", definition), ("Can you give me an example?", example)]


def def_chat_zh(d):
    term, definition, example = d
    return [(f"什么是{term}？", definition), ("能举个例子吗？", example)]


def translate_chat_en(pairs):
    (e1, z1), (e2, z2) = pairs[:2]
    turns = [
        (f'How do you say "{e1}" in Chinese?', f'"{e1}" in Chinese is "{z1}".'),
        (f'And "{e2}"?', f'"{e2}" is "{z2}".'),
    ]
    if len(pairs) > 2:
        e3, z3 = pairs[2]
        turns.append((f'What about "{e3}"?', f'That is "{z3}".'))
    return turns


def translate_chat_zh(pairs):
    (e1, z1), (e2, z2) = pairs[:2]
    return [(f"“{z1}”用英语怎么说？", f"“{z1}”的英语是“{e1}”。"), (f"那“{z2}”呢？", f"“{z2}”的英语是“{e2}”。")]


def chat_pool_sharegpt(rng):
    en, zh = [], []
    en += [country_chat_en(c) for c in T.COUNTRIES[10:25]]  # 15
    en += [animal_chat_en(a, i % 2 == 0) for i, a in enumerate(T.ANIMALS)]  # 15
    en += [def_chat_en(d) for d in T.DEFS_EN[13:28]]  # 15
    en += [arith_chain_en(rng) for _ in range(8)]  # 8
    p = T.PHRASES[18:39]
    en += [translate_chat_en(p[3 * i : 3 * i + (3 if i % 2 else 2)]) for i in range(7)]  # 7
    zh += [country_chat_zh(c) for c in T.COUNTRIES[12:22]]  # 10
    zh += [animal_chat_zh(a, i % 2 == 1) for i, a in enumerate(T.ANIMALS[:10])]  # 10
    zh += [def_chat_zh(d) for d in T.DEFS_ZH[15:25]]  # 10
    zh += [arith_chain_zh(rng) for _ in range(5)]  # 5
    p = T.PHRASES[0:10]
    zh += [translate_chat_zh(p[2 * i : 2 * i + 2]) for i in range(5)]  # 5
    return en, zh


def interleave(en, zh, rng):
    tagged = [("en", t) for t in en] + [("zh", t) for t in zh]
    rng.shuffle(tagged)
    return tagged


def sharegpt(rng):
    en, zh = chat_pool_sharegpt(rng)
    rows = []
    for i, (lang, turns) in enumerate(interleave(en, zh, rng)):
        conv = []
        if i % 10 in (0, 3, 6):
            pool = T.SYS_POOL_EN if lang == "en" else T.SYS_POOL_ZH
            conv.append({"from": "system", "value": pool[i % len(pool)]})
        for u, a in turns:
            conv.append({"from": "human", "value": u})
            conv.append({"from": "gpt", "value": a})
        rows.append({"conversations": conv})
    return rows


THANKS_EN = [
    ("Thanks!", "You're welcome! Happy to help."),
    ("Great, thank you.", "Glad I could help. Ask me anything else any time."),
    ("That helps a lot.", "I'm glad it helps!"),
]
THANKS_ZH = [
    ("谢谢！", "不客气，很高兴能帮到你。"),
    ("太好了，谢谢你。", "不用谢，有问题随时问我。"),
    ("这很有用。", "能帮上忙我很高兴！"),
]


def messages(rng):
    en, zh = [], []
    # identity chats: hand-picked sequences of IDENTITY_* rows (hello, who, name, can do,
    # morning, human?, thanks, goodbye, introduce, other language)
    for seq in ([0, 3, 6], [1, 5], [4, 2, 7], [2, 9], [8, 3, 7], [9, 6], [0, 9, 7], [5, 3]):
        en.append([T.IDENTITY_EN[j] for j in seq])
        zh.append([T.IDENTITY_ZH[j] for j in seq])
    for i, qa in enumerate(T.HOWTO_EN):
        en.append([qa, THANKS_EN[(i // 3) % 3]] if i % 3 == 0 else [qa])
    for i, qa in enumerate(T.HOWTO_ZH):
        zh.append([qa, THANKS_ZH[(i // 3) % 3]] if i % 3 == 0 else [qa])
    en += [[qa] for qa in T.LISTS_EN]
    zh += [[qa] for qa in T.LISTS_ZH]
    for ins, x, o in T.REWRITE_EN:
        en.append([(f"{ins}\n\n{x}", o)])
    for ins, x, o in T.REWRITE_ZH:
        zh.append([(f"{ins}\n\n{x}", o)])
    en += [arith_chain_en(rng) for _ in range(5)]
    zh += [arith_chain_zh(rng) for _ in range(5)]
    rows = []
    for i, (lang, turns) in enumerate(interleave(en, zh, rng)):
        msgs = []
        if i % 4 == 0:
            pool = T.SYS_POOL_EN if lang == "en" else T.SYS_POOL_ZH
            msgs.append({"role": "system", "content": pool[(i // 4) % len(pool)]})
        for u, a in turns:
            msgs.append({"role": "user", "content": u})
            msgs.append({"role": "assistant", "content": a})
        rows.append({"messages": msgs})
    return rows


def prompt_completion(rng):
    en, zh = [], []
    for c in T.COUNTRIES[:10]:
        en.append((f"Q: What is the capital of {c[0]}?\nA:", f" {c[1]}."))
    en += [(f"Q: {q}\nA:", f" {a}") for q, a in T.FACTS_EN[:10]]
    en += [(f"Q: What is {t}?\nA:", f" {d}") for t, d, _ in T.DEFS_EN[:8]]
    en += list(T.COMPLETE_EN)
    en += [(f"English: {e}\nChinese:", f" {z}") for e, z in T.PHRASES[30:36]]
    for c in T.COUNTRIES[10:20]:
        zh.append((f"问：{c[5]}的首都是哪里？\n答：", f"{c[6]}。"))
    zh += [(f"问：{q}\n答：", a) for q, a in T.FACTS_ZH[:10]]
    zh += [(f"问：什么是{t}？\n答：", d) for t, d, _ in T.DEFS_ZH[:8]]
    zh += list(T.COMPLETE_ZH)
    zh += [(f"中文：{z}\n英文：", e) for e, z in T.PHRASES[36:40]]
    rows = [{"prompt": p, "completion": c} for _, (p, c) in interleave(en, zh, rng)]
    return rows


def text(rng):
    en, zh = list(T.TEXT_EN), list(T.TEXT_ZH)
    for plural, desc, food, habitat, *_ in T.ANIMALS:
        en.append(f"{desc} {plural} eat mostly {food}. They live in {habitat}.")
    for i, c in enumerate(T.COUNTRIES[:15]):
        name, cap, lang, cont, note = c[:5]
        Name = name[0].upper() + name[1:]
        if i % 2 == 0:
            en.append(
                f"{Name} is a country in {cont}. Its capital is {cap}, and people there mainly speak {lang}. {note}"
            )
        else:
            en.append(
                f"The capital of {name} is {cap}. {Name} is in {cont}, and its people mainly speak {lang}. {note}"
            )
    for a in T.ANIMALS:
        name, desc, food, habitat = a[4:]
        zh.append(f"{desc}{name}主要吃{food}。它们生活在{habitat}。")
    for c in T.COUNTRIES[:10]:
        name, cap, lang, cont, note = c[5:]
        zh.append(f"{name}是{cont}的一个国家，首都是{cap}。那里的人主要说{lang}。{note}")
    return [{"text": t} for _, t in interleave(en, zh, rng)]


# ---------------------------------------------------------------- write


def write_json(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main():
    rng = random.Random(SEED)
    outputs = {
        "alpaca_en_demo.json": alpaca_en(rng),
        "alpaca_zh_demo.json": alpaca_zh(rng),
        "sharegpt_demo.jsonl": sharegpt(rng),
        "messages_demo.jsonl": messages(rng),
        "prompt_completion_demo.jsonl": prompt_completion(rng),
        "text_demo.jsonl": text(rng),
    }
    chars = set()
    for name, rows in outputs.items():
        (write_json if name.endswith(".json") else write_jsonl)(DATA / name, rows)
        print(f"{name}: {len(rows)} rows")
        chars |= {ch for ch in json.dumps(rows, ensure_ascii=False) if ord(ch) > 127}
    if "--charset" in sys.argv:
        print(f"{len(chars)} distinct non-ASCII characters:")
        print("".join(sorted(chars)))


if __name__ == "__main__":
    main()
