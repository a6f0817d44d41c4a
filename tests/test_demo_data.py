"""The shipped demo datasets in data/: registry, schema, lengths, duplicates, README counts.

Uses only the standard library and PyYAML (no finetune import), so it runs anywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).resolve().parent.parent / "data"
REGISTRY = DATA / "datasets.yaml"
README = DATA / "README.md"

FORMATS = {"alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "kto"}
LANGUAGES = {"en", "zh", "mixed"}
ENTRY_KEYS = {"path", "hub", "split", "format", "columns", "language", "description"}
DEMO_SETS = {
    "alpaca_en_demo",
    "alpaca_zh_demo",
    "sharegpt_demo",
    "messages_demo",
    "prompt_completion_demo",
    "text_demo",
    "preference_en_demo",
    "preference_zh_demo",
    "kto_demo",
}

MAX_ANSWER_EN = 160  # characters, answers without Chinese characters
MAX_ANSWER_ZH = 60  # characters, answers that contain Chinese characters
MAX_TEXT_EN = 400
MAX_TEXT_ZH = 150

_CJK = re.compile(r"[\u3400-\u9fff]")


def has_cjk(s: str) -> bool:
    return bool(_CJK.search(s))


def registry() -> dict:
    return yaml.safe_load(REGISTRY.read_text(encoding="utf-8"))


def local_entries() -> list[str]:
    return [name for name, e in registry().items() if "path" in e]


def load_rows(entry: dict) -> list:
    path = DATA / entry["path"]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        assert isinstance(rows, list), f"{path.name}: top level must be a JSON array"
        return rows
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        assert line.strip(), f"{path.name}:{i}: blank line"
        rows.append(json.loads(line))
    return rows


def nonempty_str(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


# ------------------------------------------------------------ per-format views
# Each returns (answers, prompt_key): the assistant texts to length-check, and the
# prompt side of the row, which must be unique within a file.


def view_alpaca(r, where):
    for k in ("instruction", "input", "output"):
        assert isinstance(r.get(k), str), f"{where}: '{k}' must be a string"
    assert nonempty_str(r["instruction"]) and nonempty_str(r["output"]), f"{where}: empty instruction/output"
    extra = set(r) - {"instruction", "input", "output", "system", "history"}
    assert not extra, f"{where}: unexpected keys {sorted(extra)}"
    answers = [r["output"]]
    if "system" in r:
        assert nonempty_str(r["system"]), f"{where}: empty system"
    if "history" in r:
        h = r["history"]
        assert isinstance(h, list) and 1 <= len(h) <= 2, f"{where}: history must be 1-2 [user, assistant] pairs"
        for pair in h:
            assert isinstance(pair, list) and len(pair) == 2 and all(map(nonempty_str, pair)), (
                f"{where}: bad history pair {pair!r}"
            )
            answers.append(pair[1])
    key = (r.get("system", ""), json.dumps(r.get("history", []), ensure_ascii=False), r["instruction"], r["input"])
    return answers, key


def _check_turns(roles, where, system, user, assistant, max_pairs):
    assert roles, f"{where}: no turns"
    body = roles[1:] if roles[0] == system else roles
    assert system not in body, f"{where}: system turn only allowed first"
    assert len(body) % 2 == 0 and body, f"{where}: turns must be user/assistant pairs, got {roles}"
    assert body[0::2] == [user] * (len(body) // 2), f"{where}: roles must alternate starting with {user}: {roles}"
    assert body[1::2] == [assistant] * (len(body) // 2), (
        f"{where}: roles must alternate, ending with {assistant}: {roles}"
    )
    assert 1 <= len(body) // 2 <= max_pairs, f"{where}: {len(body) // 2} turn pairs"


def view_sharegpt(r, where):
    assert set(r) == {"conversations"}, f"{where}: keys must be exactly ['conversations']"
    conv = r["conversations"]
    for t in conv:
        assert set(t) == {"from", "value"} and nonempty_str(t["value"]), f"{where}: bad turn {t!r}"
    _check_turns([t["from"] for t in conv], where, "system", "human", "gpt", max_pairs=3)
    assert len([t for t in conv if t["from"] == "human"]) >= 2, f"{where}: sharegpt demo chats have 2-3 turn pairs"
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    return answers, tuple(t["value"] for t in conv if t["from"] != "gpt")


def view_messages(r, where):
    assert set(r) == {"messages"}, f"{where}: keys must be exactly ['messages']"
    msgs = r["messages"]
    for m in msgs:
        assert set(m) == {"role", "content"} and nonempty_str(m["content"]), f"{where}: bad message {m!r}"
    _check_turns([m["role"] for m in msgs], where, "system", "user", "assistant", max_pairs=3)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    return answers, tuple(m["content"] for m in msgs if m["role"] != "assistant")


def view_prompt_completion(r, where):
    assert set(r) == {"prompt", "completion"}, f"{where}: keys must be exactly ['prompt', 'completion']"
    assert nonempty_str(r["prompt"]) and nonempty_str(r["completion"]), f"{where}: empty prompt/completion"
    return [r["completion"]], r["prompt"]


def view_text(r, where):
    assert set(r) == {"text"} and nonempty_str(r["text"]), f"{where}: needs one non-empty 'text'"
    t = r["text"]
    if has_cjk(t):
        n = len(re.findall(r"[。！？]", t))
        assert len(t) <= MAX_TEXT_ZH, f"{where}: paragraph longer than {MAX_TEXT_ZH} characters"
    else:
        n = len(re.findall(r"[.!?](?:\s|$)", t))
        assert len(t) <= MAX_TEXT_EN, f"{where}: paragraph longer than {MAX_TEXT_EN} characters"
    assert 2 <= n <= 4, f"{where}: paragraph should have 2-4 sentences, found {n}"
    return [], t


def _answer_text(a, where):
    """A preference/KTO answer: a string or a message list ending with the assistant turn."""
    if isinstance(a, list):
        for m in a:
            assert set(m) == {"role", "content"} and nonempty_str(m["content"]), f"{where}: bad message {m!r}"
        assert a[-1]["role"] == "assistant", f"{where}: answer must end with an assistant turn"
        return a[-1]["content"], tuple(m["content"] for m in a[:-1])
    assert nonempty_str(a), f"{where}: empty answer"
    return a, ()


def view_preference(r, where):
    if "images" in r:  # image pairs: the prompt is its text and images (the same question asked of each image)
        assert isinstance(r["images"], list) and r["images"], f"{where}: images must be a non-empty list"
        answers, prompt = view_preference({k: v for k, v in r.items() if k != "images"}, where)
        return answers, json.dumps([prompt, r["images"]])
    if isinstance(r.get("prompt"), list) and any(isinstance(m.get("content"), list) for m in r["prompt"]):
        return view_preference({**r, "prompt": json.dumps(r["prompt"])}, where)  # image content parts
    assert set(r) in ({"prompt", "chosen", "rejected"}, {"chosen", "rejected"}), f"{where}: keys {sorted(r)}"
    (chosen, shared), (rejected, shared_r) = _answer_text(r["chosen"], where), _answer_text(r["rejected"], where)
    assert chosen.strip() != rejected.strip(), f"{where}: chosen and rejected are identical"
    assert shared == shared_r, f"{where}: implicit-prompt pair must share its prompt turns"
    prompt = r.get("prompt", shared)
    assert prompt and (not isinstance(prompt, str) or nonempty_str(prompt)), f"{where}: empty prompt"
    return [chosen, rejected], prompt


def view_kto(r, where):
    assert set(r) == {"prompt", "completion", "label"}, f"{where}: keys must be prompt, completion, label"
    assert isinstance(r["label"], bool), f"{where}: label must be true or false"
    assert nonempty_str(r["prompt"]), f"{where}: empty prompt"
    return [_answer_text(r["completion"], where)[0]], r["prompt"]


VIEWS = {
    "preference": view_preference,
    "kto": view_kto,
    "alpaca": view_alpaca,
    "sharegpt": view_sharegpt,
    "messages": view_messages,
    "prompt_completion": view_prompt_completion,
    "text": view_text,
}


def view_converted(fmt):
    """Chats with reasoning or tool calls: read by finetune's own converter (which checks them)."""

    def view(r, where):
        from finetune.data import formats
        from finetune.data.sources import Record

        [example] = formats.convert([Record(r, where)], fmt, {})
        msgs = example["messages"]
        assert "tools" in example or any(m.get("reasoning_content") for m in msgs), f"{where}: no tools or reasoning"
        return [m["content"] for m in msgs if m["role"] == "assistant" and m["content"]], tuple(
            m["content"] for m in msgs if m["role"] == "user"
        )

    return view


def view_vision(fmt):
    """Chats with images: read by finetune's own converter (which resolves and checks every image file)."""

    def view(r, where):
        from finetune.data import formats
        from finetune.data.images import text_of
        from finetune.data.sources import Record

        [example] = formats.convert([Record(r, where, root=str(DATA / "vision"))], fmt, {})
        assert len(example["images"]) == 1, f"{where}: one image per demo question"
        msgs = example["messages"]
        prompt = tuple(text_of(m["content"]) for m in msgs if m["role"] == "user")
        return [m["content"] for m in msgs if m["role"] == "assistant"], (prompt, tuple(example["images"]))

    return view


# the demo sets of reasoning, tool calls and images (finetune/data/formats.py defines their fields)
NAME_VIEWS = {
    "vision_en_demo": view_vision("messages"),
    "vision_zh_demo": view_vision("sharegpt"),
    "reasoning_demo": view_converted("messages"),
    "tools_demo": view_converted("messages"),
    "sharegpt_tools_demo": view_converted("sharegpt"),
}


def normalise(obj) -> str:
    s = json.dumps(obj, ensure_ascii=False, sort_keys=True).lower()
    return re.sub(r"[\W_]+", "", s)


# ------------------------------------------------------------------ tests


def test_registry_schema():
    reg = registry()
    assert isinstance(reg, dict) and reg
    assert DEMO_SETS <= set(reg), f"missing entries: {sorted(DEMO_SETS - set(reg))}"
    for name, e in reg.items():
        assert isinstance(e, dict), name
        assert not set(e) - ENTRY_KEYS, f"{name}: unknown keys {sorted(set(e) - ENTRY_KEYS)}"
        assert ("path" in e) != ("hub" in e), f"{name}: exactly one of path / hub"
        assert e.get("format") in FORMATS, f"{name}: format {e.get('format')!r}"
        assert e.get("language") in LANGUAGES, f"{name}: language {e.get('language')!r}"
        assert nonempty_str(e.get("description")), f"{name}: description"
        if "columns" in e:
            assert isinstance(e["columns"], dict), f"{name}: columns must be a mapping"
        if "path" in e:
            assert not Path(e["path"]).is_absolute() and (DATA / e["path"]).is_file(), f"{name}: {e['path']} missing"


@pytest.mark.parametrize("name", local_entries())
def test_rows_valid(name):
    e = registry()[name]
    rows = load_rows(e)
    assert rows, f"{name}: no rows"
    view = NAME_VIEWS.get(name) or VIEWS[e["format"]]
    seen_rows, seen_keys = {}, {}
    for i, r in enumerate(rows):
        where = f"{e['path']} row {i}"
        assert isinstance(r, dict), f"{where}: must be an object"
        answers, key = view(r, where)
        for a in answers:
            limit = MAX_ANSWER_ZH if has_cjk(a) else MAX_ANSWER_EN
            assert len(a.strip()) <= limit, f"{where}: answer longer than {limit} characters: {a!r}"
        n = normalise(r)
        assert n not in seen_rows, f"{where}: duplicates row {seen_rows[n]}"
        seen_rows[n] = i
        k = normalise(key)
        assert k not in seen_keys, f"{where}: same prompt as row {seen_keys[k]}"
        seen_keys[k] = i


@pytest.mark.parametrize("name", local_entries())
def test_language(name):
    e = registry()[name]
    rows = load_rows(e)
    zh = sum(has_cjk(json.dumps(r, ensure_ascii=False)) for r in rows)
    if e["language"] == "zh":
        assert zh == len(rows), f"{name}: {len(rows) - zh} rows without Chinese"
    elif e["language"] == "en":
        assert zh <= 0.2 * len(rows), f"{name}: {zh} of {len(rows)} rows contain Chinese"
    else:
        assert 0.2 * len(rows) <= zh <= 0.8 * len(rows), f"{name}: {zh} of {len(rows)} rows Chinese, not mixed"


@pytest.mark.parametrize("name", local_entries())
def test_common_chinese_characters_only(name):
    """Chinese must be simplified, common (GB2312) characters: the tiny test model's corpus covers them."""
    text = (DATA / registry()[name]["path"]).read_text(encoding="utf-8")
    bad = set()
    for ch in set(_CJK.findall(text)):
        try:
            ch.encode("gb2312")
        except UnicodeEncodeError:
            bad.add(ch)
    assert not bad, f"{name}: uncommon or traditional characters {''.join(sorted(bad))}"


def readme_table() -> dict[str, dict]:
    """The demo-set table in data/README.md: | name | file | format | language | rows |."""
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[4].isdigit():
            rows[cells[0]] = {"path": cells[1], "format": cells[2], "language": cells[3], "rows": int(cells[4])}
    return rows


def test_readme_table_matches_data():
    table, reg = readme_table(), registry()
    local = set(local_entries())
    assert set(table) == local, f"README table {sorted(table)} vs registry {sorted(local)}"
    for name in local:
        e = reg[name]
        got = {"path": e["path"], "format": e["format"], "language": e["language"], "rows": len(load_rows(e))}
        assert table[name] == got, f"data/README.md says {table[name]}, data says {got}"
