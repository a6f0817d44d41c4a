"""Bad input through the real CLI: a non-zero exit, exactly one `finetune: error:` line that
names the file, line/record and field, no traceback, and no output dir left behind.

Every case is a real `finetune train` (not --dry-run), so "nothing half-written" is tested;
the recipes keep train.max_steps=1 so nothing expensive runs even if validation let one
through. The subprocesses (each pays the torch/transformers import) run concurrently from
one module fixture; each test then checks one case's result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ERROR = "finetune: error:"


@dataclass
class Case:
    name: str
    cwd: Path
    argv: list[str]
    expect: list[str] = field(default_factory=list)  # substrings of the error line
    output_dir: Path | None = None
    result: subprocess.CompletedProcess | None = None

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.result.stderr.splitlines() if line.startswith(ERROR)]

    @property
    def other_stderr(self) -> list[str]:
        return [line for line in self.result.stderr.splitlines() if line.strip() and not line.startswith(ERROR)]


def _env() -> dict:
    env = dict(os.environ)  # carries FINETUNE_CACHE (conftest)
    assert env.get("FINETUNE_CACHE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def _recipe(d: Path, train_file, **extra) -> tuple[Path, Path]:
    """A minimal tiny-llama recipe in `d`, training on `train_file`; returns (recipe, output dir)."""
    out = d / "out"
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": "tiny-llama"},
        "data": {"train": str(train_file), **extra.pop("data", {})},
        "train": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 256, "save_steps": 1000,
                  **extra.pop("train", {})},
        "output": {"dir": str(out)},
    }
    assert not extra
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path, out


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"instruction": "Say hello.", "input": "", "output": "Hello!"}
LONG = {"instruction": "Read this: " + "words and more words " * 10, "input": "", "output": "OK"}
TRAIN = [sys.executable, "-m", "finetune", "train"]
PREVIEW = [sys.executable, "-m", "finetune", "data", "preview"]


def _cases(root: Path) -> dict[str, Case]:
    cases = []

    def new(name: str) -> Path:
        d = root / name
        d.mkdir()
        return d

    d = new("missing_file")
    missing = d / "nope.jsonl"
    recipe, out = _recipe(d, missing)
    cases.append(Case("missing_file", d, TRAIN + [str(recipe)], ["data.train", str(missing), "file not found"], out))

    d = new("malformed_json_line")
    f = d / "bad.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"instruction": "x", "output": \n', encoding="utf-8")
    recipe, out = _recipe(d, f, data={"format": "alpaca"})
    cases.append(Case("malformed_json_line", d, TRAIN + [str(recipe)], [f"{f}:3:", "malformed JSON"], out))

    d = new("missing_field")
    f = _jsonl(d / "no_output.jsonl", [GOOD, {"instruction": "Say bye.", "input": ""}])
    recipe, out = _recipe(d, f, data={"format": "alpaca"})
    cases.append(Case("missing_field", d, TRAIN + [str(recipe)], [f"{f}:2: field 'output': missing"], out))

    d = new("empty_jsonl")
    f = d / "empty.jsonl"
    f.write_text("", encoding="utf-8")
    recipe, out = _recipe(d, f, data={"format": "alpaca"})
    cases.append(Case("empty_jsonl", d, TRAIN + [str(recipe)], [f"{f}: empty dataset"], out))

    d = new("empty_json_array")
    f = d / "empty.json"
    f.write_text("[]", encoding="utf-8")
    recipe, out = _recipe(d, f, data={"format": "alpaca"})
    cases.append(Case("empty_json_array", d, TRAIN + [str(recipe)], [f"{f}: empty dataset"], out))

    d = new("unknown_format")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(Case("unknown_format", d, TRAIN + [str(recipe), "data.format=foo"],
                      ["override 'data.format=foo'", "data.format", "alpaca, sharegpt, messages, prompt_completion, text", "'foo'"], out))

    d = new("misspelt_format")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(Case("misspelt_format", d, TRAIN + [str(recipe), "data.format=alpacca"],
                      ["data.format", "did you mean 'alpaca'?"], out))

    d = new("no_assistant_turn")
    f = _jsonl(d / "chats.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]},
                                   {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    recipe, out = _recipe(d, f, data={"format": "messages"})
    cases.append(Case("no_assistant_turn", d, TRAIN + [str(recipe)],
                      [f"{f}:1: field 'messages'", "no assistant turn"], out))

    d = new("all_too_long")
    f = _jsonl(d / "long.jsonl", [LONG, LONG])
    recipe, out = _recipe(d, f, data={"format": "alpaca"})
    cases.append(Case("all_too_long", d, TRAIN + [str(recipe), "train.max_length=8"],
                      [str(f), "all 2 records are longer than train.max_length=8"], out))

    d = new("unknown_key")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(Case("unknown_key", d, TRAIN + [str(recipe), "train.learnig_rate=1"],
                      ["train.learnig_rate", "did you mean 'learning_rate'?"], out))

    d = new("bad_type")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(Case("bad_type", d, TRAIN + [str(recipe), "train.max_steps=abc"],
                      ["override 'train.max_steps=abc'", "train.max_steps", "'abc'"], out))

    d = new("yaml_syntax")
    recipe = d / "recipe.yaml"
    out = d / "out"
    recipe.write_text(
        "stage: sft\n"
        "model:\n"
        "  name_or_path: tiny-llama\n"
        "data:\n"
        "  train: [alpaca_en_demo\n"  # line 5: unclosed flow sequence
        "train:\n"
        "  max_steps: 1\n"
        f"output:\n  dir: {out}\n",
        encoding="utf-8",
    )
    cases.append(Case("yaml_syntax", d, TRAIN + [str(recipe)], [str(recipe), "invalid YAML"], out))

    d = new("existing_output")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    out.mkdir()
    (out / "keep.txt").write_text("finished run\n", encoding="utf-8")
    cases.append(Case("existing_output", d, TRAIN + [str(recipe)],
                      ["output.dir", str(out), "not empty", "output.overwrite"], None))

    # An invalid TRL-config combination is only found when the TRL config is built.
    d = new("bad_trl_combination")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(Case("bad_trl_combination", d, TRAIN + [str(recipe), "train.load_best_model_at_end=true"],
                      [str(recipe), "load_best_model_at_end"], out))

    # Adapter methods: a key the method does not read fails at load; a freeze selection the model
    # does not have fails once the model is loaded, still before the output dir exists.
    d = new("full_with_4bit")
    recipe, out = _recipe(d, _jsonl(d / "ok.jsonl", [GOOD] * 4))
    cases.append(Case("full_with_4bit", d, TRAIN + [str(recipe), "adapter.method=full", "adapter.quant_bits=8"],
                      ["override 'adapter.quant_bits=8'", "not used by adapter.method=full"], out))
    d = new("freeze_unknown_module")
    recipe, out = _recipe(d, _jsonl(d / "ok.jsonl", [GOOD] * 4))
    cases.append(Case("freeze_unknown_module", d, TRAIN + [str(recipe), "adapter.method=freeze", "adapter.trainable_modules=[lm_heda]"],
                      ["adapter.trainable_modules", "'lm_heda' matches no module"], out))

    # --debug: the same (cheap) recipe error, with the traceback
    for name, argv in (("debug_after", ["RECIPE", "data.format=foo", "--debug"]),
                       ("debug_before", ["--debug", "train", "RECIPE", "data.format=foo"])):
        d = new(name)
        recipe, out = _recipe(d, _jsonl(d / "ok.jsonl", [GOOD] * 4))
        argv = [str(recipe) if a == "RECIPE" else a for a in argv]
        base = TRAIN if name == "debug_after" else [sys.executable, "-m", "finetune"]
        cases.append(Case(name, d, base + argv, [], out))

    d = new("preview")
    cases.append(Case("preview", d, PREVIEW + ["alpaca_en_demo", "--model", "tiny-llama"]))
    d = new("preview_bad_index")
    cases.append(Case("preview_bad_index", d, PREVIEW + ["alpaca_en_demo", "--model", "tiny-llama", "--index", "9999"],
                      ["alpaca_en_demo.json", "--index 9999 is out of range (0.."]))
    return {c.name: c for c in cases}


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_path) -> dict[str, Case]:
    # tiny_path: the tiny model is built (once) before the subprocesses look for it
    cases = _cases(tmp_path_factory.mktemp("bad_input"))
    env = _env()

    def run(case: Case) -> None:
        case.result = subprocess.run(case.argv, cwd=case.cwd, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(run, cases.values()))
    return cases


ERROR_CASES = ["missing_file", "malformed_json_line", "missing_field", "empty_jsonl", "empty_json_array",
               "unknown_format", "misspelt_format", "no_assistant_turn", "all_too_long", "unknown_key",
               "bad_type", "yaml_syntax", "existing_output", "full_with_4bit", "freeze_unknown_module"]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_input_is_one_line_and_writes_nothing(cli, name):
    case = cli[name]
    r = case.result
    assert r.returncode != 0, f"{name}: exit 0\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(case.error_lines) == 1, r.stderr
    line = case.error_lines[0]
    for part in case.expect:
        assert part in line, f"{part!r} not in {line!r}"
    if case.output_dir is not None:
        assert not case.output_dir.exists(), f"{case.output_dir} was created"
        incomplete = case.output_dir.with_name(case.output_dir.name + ".incomplete")
        assert not incomplete.exists(), f"{incomplete} was left behind: {sorted(p.name for p in incomplete.iterdir())}"


def test_invalid_trl_config_combination_writes_nothing(cli):
    """A combination only the TRL config rejects must fail before the run dir is made."""
    case = cli["bad_trl_combination"]
    r = case.result
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(case.error_lines) == 1, r.stderr
    for part in case.expect:
        assert part in case.error_lines[0]
    assert not case.output_dir.exists()
    incomplete = case.output_dir.with_name("out.incomplete")
    assert not incomplete.exists(), f"{incomplete} was left behind: {sorted(p.name for p in incomplete.iterdir())}"


def test_invalid_trl_config_combination_message_is_complete(cli):
    """TRL's message spans several lines; the one error line must keep what it found."""
    line = cli["bad_trl_combination"].error_lines[0]
    assert "Evaluation strategy" in line and "Save strategy" in line, line


def test_yaml_error_names_the_line(cli):
    line = cli["yaml_syntax"].error_lines[0]
    m = re.search(r"recipe\.yaml:(\d+): invalid YAML", line)
    assert m, line
    assert int(m.group(1)) in (5, 6), line  # the unclosed `[` (5) or where the parser noticed (6)


def test_existing_output_dir_is_left_untouched(cli):
    out = cli["existing_output"].cwd / "out"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "finished run\n"
    assert not out.with_name("out.incomplete").exists()


@pytest.mark.parametrize("name", ["debug_after", "debug_before"])
def test_debug_shows_the_traceback(cli, name):
    case = cli[name]
    r = case.result
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr, r.stderr
    assert "RecipeError" in r.stderr and "data.format" in r.stderr
    assert not case.output_dir.exists()
    assert not case.output_dir.with_name("out.incomplete").exists()


def test_preview_marks_exactly_the_answer(cli):
    r = cli["preview"].result
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    record = json.loads((REPO / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[0]
    assert record["input"] == ""
    header, blank, shown = r.stdout.split("\n", 2)
    assert header.startswith(f"{REPO / 'data' / 'alpaca_en_demo.json'} record 0 (alpaca);") and blank == ""
    marked = re.findall(r"\[\[(.*?)\]\]", shown, re.S)
    assert marked == [record["output"] + "</s>"]
    assert f"<|user|>\n{record['instruction']}\n<|assistant|>\n[[{record['output']}</s>]]" in r.stdout


def test_preview_index_out_of_range_is_one_line(cli):
    case = cli["preview_bad_index"]
    r = case.result
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(case.error_lines) == 1, r.stderr
    n = len(json.loads((REPO / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    for part in case.expect + [f"(0..{n - 1})"]:
        assert part in case.error_lines[0]
    assert r.stdout == ""
