"""Bad input through the real CLI: a non-zero exit, exactly one `finetune: error:` line that
names the file, line/record and field, no traceback, and no output dir left behind. The cases (a first
part, then a catalogue covering every command) run in-process, exactly as the console script runs them,
in a few batch subprocesses (tests/_cli_batch.py): one torch import per batch, not one per case.

Every case is a real `finetune train` (not --dry-run), so "nothing half-written" is tested;
the recipes keep train.max_steps=1 so nothing expensive runs even if validation let one
through. One module fixture runs every case; each test then checks one case's result.
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
        "train": {
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "max_length": 256,
            "save_steps": 1000,
            **extra.pop("train", {}),
        },
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
TRAIN = ["train"]  # argv after `finetune`
PREVIEW = ["data", "preview"]


def _cases(root: Path) -> dict[str, Case]:
    cases = []

    def new(name: str) -> Path:
        d = root / name
        d.mkdir(parents=True)
        return d

    d = new("missing_file")
    missing = d / "nope.jsonl"
    recipe, out = _recipe(d, missing)
    cases.append(Case("missing_file", d, TRAIN + [str(recipe)], ["data.train", str(missing), "file not found"], out))

    d = new("malformed_json_line")
    f = d / "bad.jsonl"
    f.write_text(
        json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"instruction": "x", "output": \n', encoding="utf-8"
    )
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
    cases.append(
        Case(
            "unknown_format",
            d,
            TRAIN + [str(recipe), "data.format=foo"],
            [
                "override 'data.format=foo'",
                "data.format",
                "alpaca, sharegpt, messages, prompt_completion, text",
                "'foo'",
            ],
            out,
        )
    )

    d = new("misspelt_format")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(
        Case(
            "misspelt_format",
            d,
            TRAIN + [str(recipe), "data.format=alpacca"],
            ["data.format", "did you mean 'alpaca'?"],
            out,
        )
    )

    d = new("no_assistant_turn")
    f = _jsonl(
        d / "chats.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ],
    )
    recipe, out = _recipe(d, f, data={"format": "messages"})
    cases.append(
        Case("no_assistant_turn", d, TRAIN + [str(recipe)], [f"{f}:1: field 'messages'", "no assistant turn"], out)
    )

    d = new("all_too_long")
    f = _jsonl(d / "long.jsonl", [LONG, LONG])
    recipe, out = _recipe(d, f, data={"format": "alpaca"})
    cases.append(
        Case(
            "all_too_long",
            d,
            TRAIN + [str(recipe), "train.max_length=8"],
            [str(f), "all 2 records are longer than train.max_length=8"],
            out,
        )
    )

    d = new("unknown_key")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(
        Case(
            "unknown_key",
            d,
            TRAIN + [str(recipe), "train.learnig_rate=1"],
            ["train.learnig_rate", "did you mean 'learning_rate'?"],
            out,
        )
    )

    d = new("bad_type")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(
        Case(
            "bad_type",
            d,
            TRAIN + [str(recipe), "train.max_steps=abc"],
            ["override 'train.max_steps=abc'", "train.max_steps", "'abc'"],
            out,
        )
    )

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
    cases.append(
        Case(
            "existing_output",
            d,
            TRAIN + [str(recipe)],
            ["output.dir", str(out), "not empty", "output.overwrite"],
            None,
        )
    )

    # An invalid TRL-config combination is only found when the TRL config is built.
    d = new("bad_trl_combination")
    f = _jsonl(d / "ok.jsonl", [GOOD] * 4)
    recipe, out = _recipe(d, f)
    cases.append(
        Case(
            "bad_trl_combination",
            d,
            TRAIN + [str(recipe), "train.load_best_model_at_end=true"],
            [str(recipe), "load_best_model_at_end"],
            out,
        )
    )

    # Adapter methods: a key the method does not read fails at load; a freeze selection the model
    # does not have fails once the model is loaded, still before the output dir exists.
    d = new("full_with_4bit")
    recipe, out = _recipe(d, _jsonl(d / "ok.jsonl", [GOOD] * 4))
    cases.append(
        Case(
            "full_with_4bit",
            d,
            TRAIN + [str(recipe), "adapter.method=full", "adapter.quant_bits=8"],
            ["override 'adapter.quant_bits=8'", "not used by adapter.method=full"],
            out,
        )
    )
    d = new("freeze_unknown_module")
    recipe, out = _recipe(d, _jsonl(d / "ok.jsonl", [GOOD] * 4))
    cases.append(
        Case(
            "freeze_unknown_module",
            d,
            TRAIN + [str(recipe), "adapter.method=freeze", "adapter.trainable_modules=[lm_heda]"],
            ["adapter.trainable_modules", "'lm_heda' matches no module"],
            out,
        )
    )

    # --debug: the same (cheap) recipe error, with the traceback
    for name, argv in (
        ("debug_after", ["RECIPE", "data.format=foo", "--debug"]),
        ("debug_before", ["--debug", "train", "RECIPE", "data.format=foo"]),
    ):
        d = new(name)
        recipe, out = _recipe(d, _jsonl(d / "ok.jsonl", [GOOD] * 4))
        argv = [str(recipe) if a == "RECIPE" else a for a in argv]
        base = TRAIN if name == "debug_after" else []
        cases.append(Case(name, d, base + argv, [], out))

    d = new("preview")
    cases.append(Case("preview", d, PREVIEW + ["alpaca_en_demo", "--model", "tiny-llama"]))
    d = new("preview_bad_index")
    cases.append(
        Case(
            "preview_bad_index",
            d,
            PREVIEW + ["alpaca_en_demo", "--model", "tiny-llama", "--index", "9999"],
            ["alpaca_en_demo.json", "--index 9999 is out of range (0.."],
        )
    )
    return {c.name: c for c in cases}


@pytest.fixture(scope="module")
def cli(batched) -> dict[str, Case]:
    return batched[0]


ERROR_CASES = [
    "missing_file",
    "malformed_json_line",
    "missing_field",
    "empty_jsonl",
    "empty_json_array",
    "unknown_format",
    "misspelt_format",
    "no_assistant_turn",
    "all_too_long",
    "unknown_key",
    "bad_type",
    "yaml_syntax",
    "existing_output",
    "full_with_4bit",
    "freeze_unknown_module",
]


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


# ----------------------------------------------------------------------------- the catalogue (issue 15)
# Every command, table-driven: exit 2, exactly one `finetune: error:` line holding the expected parts,
# no traceback, and nothing left behind (no output, no DIR.incomplete). These cases run in-process in
# a few batch subprocesses (tests/_cli_batch.py): one torch import per batch instead of one per case.

BATCHES = 2


class Evil:
    """Unpickling this runs `touch MARKER`: a planted pickle must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _adapter_dirs(root: Path, tiny_path: str) -> dict[str, Path]:
    """A real LoRA adapter of the tiny model, a truncated copy, and a pickled one carrying a payload."""
    import pickle
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    good = root / "adapter_good"
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(good)
    truncated = root / "adapter_truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickled = root / "adapter_pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(Evil(root / "PWNED")))
    return {"good": good, "truncated": truncated, "pickled": pickled, "marker": root / "PWNED"}


def _catalogue(root: Path, tiny_path: str) -> tuple[list[dict], Path]:
    """The cases ({name, cwd, argv, expect, leaves}) and the marker file any planted pickle would write."""
    adapters = _adapter_dirs(root, tiny_path)
    cases: list[dict] = []

    def case(name, argv, expect, leaves=()):
        d = root / "cat" / name
        d.mkdir(parents=True, exist_ok=True)
        argv = argv(d) if callable(argv) else argv
        cases.append(
            {
                "name": name,
                "cwd": str(d),
                "argv": [str(a) for a in argv],
                "expect": expect,
                "leaves": [str(p(d)) if callable(p) else str(p) for p in leaves],
            }
        )

    def recipe(d: Path, **extra) -> tuple[Path, Path]:
        return _recipe(d, _jsonl(d / "ok.jsonl", [GOOD] * 4), **extra)

    def train(*overrides, **extra):
        def argv(d):
            path, _ = recipe(d, **extra)
            return ["train", path, *overrides]

        return argv

    def out(d):
        return d / "out"

    def inc(d):
        return d / "out.incomplete"

    # train: recipe values
    case("nan_lr", train("train.learning_rate=.nan"), ["train.learning_rate", "not a finite number"], [out, inc])
    case("inf_lr", train("train.learning_rate=.inf"), ["train.learning_rate", "not a finite number"], [out, inc])
    case(
        "huge_lr_in_file",
        train(train={"learning_rate": "1e400"}),
        ["recipe.yaml:", "train.learning_rate", "'1e400'", "not a finite number"],
        [out, inc],
    )
    case("negative_alpha", train("adapter.alpha=-16"), ["adapter.alpha", "must be positive"], [out, inc])
    case("save_steps_zero", train("train.save_steps=0"), ["train.save_steps", "must be positive"], [out, inc])
    case("bad_target_modules", train("adapter.target_modules=[no_such_proj]"), ["adapter", "no_such_proj"], [out, inc])
    case("absurd_r", train("adapter.r=100000000"), ["adapter.r", "more than the model"], [out, inc])
    case(
        "resume_not_checkpoint",
        lambda d: ["train", recipe(d)[0], f"train.resume={d}"],
        ["train.resume", "not a checkpoint"],
        [out, inc],
    )
    case(
        "jinja_syntax_error",
        train("model.chat_template='{% for m in messages %}{{ m.content }'"),
        ["model.chat_template", "Jinja"],
        [out, inc],
    )

    def dup_key(d):
        path, _ = recipe(d)
        text = path.read_text(encoding="utf-8").replace("stage: sft\n", "stage: sft\nstage: dpo\n")
        path.write_text(text, encoding="utf-8")
        return ["train", path]

    case("duplicate_key", dup_key, ["recipe.yaml:2", "duplicate key 'stage'"], [out, inc])

    def latin1_recipe(d):
        path, _ = recipe(d)
        path.write_bytes(path.read_bytes() + "# café\n".encode("latin-1"))
        return ["train", path]

    case("recipe_latin1", latin1_recipe, ["recipe.yaml", "not UTF-8"], [out, inc])

    def binary_data(d):
        f = d / "garbage.jsonl"
        f.write_bytes(bytes(range(256)) * 4)
        path, _ = _recipe(d, f, data={"format": "alpaca"})
        return ["train", path]

    case("data_binary", binary_data, ["garbage.jsonl"], [out, inc])

    def latin1_data(d):
        f = d / "latin1.jsonl"
        f.write_bytes(
            json.dumps(GOOD).encode() + b"\n" + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")
        )
        path, _ = _recipe(d, f, data={"format": "alpaca"})
        return ["train", path]

    case("data_latin1", latin1_data, ["latin1.jsonl", "not UTF-8"], [out, inc])

    def model_without_weights(d):
        m = d / "model"
        m.mkdir()
        (m / "config.json").write_text(Path(tiny_path, "config.json").read_text(encoding="utf-8"), encoding="utf-8")
        return ["train", recipe(d)[0], f"model.name_or_path={m}"]

    case("model_dir_without_weights", model_without_weights, ["model"], [out, inc])

    def model_is_file(d):
        (d / "model.bin").write_bytes(b"not a model")
        return ["train", recipe(d)[0], f"model.name_or_path={d / 'model.bin'}"]

    case("model_is_a_file", model_is_file, ["model.name_or_path", "model.bin"], [out, inc])

    def parent_is_file(d):
        (d / "afile").write_text("x", encoding="utf-8")
        return ["train", recipe(d)[0], f"output.dir={d / 'afile' / 'out'}"]

    case("train_output_parent_is_file", parent_is_file, ["afile"], [lambda d: d / "afile" / "out"])

    def resume_planted_pickle(d):
        path, _ = recipe(d)
        ckpt = d / "out.incomplete" / "checkpoint-1"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text('{"global_step": 1, "log_history": []}', encoding="utf-8")
        import pickle

        (ckpt / "optimizer.pt").write_bytes(pickle.dumps(Evil(adapters["marker"])))
        return ["train", path, f"train.resume={ckpt}"]

    case("resume_planted_pickle", resume_planted_pickle, ["optimizer.pt", "train.resume=never"], [out])

    # pipeline
    def pipeline_duplicate_stage(d):
        path, _ = recipe(d)
        p = d / "pipe.yaml"
        p.write_text(
            f"output:\n  dir: {d / 'pipe_out'}\nstages:\n  sft:\n    recipe: {path}\n  sft:\n    recipe: {path}\n",
            encoding="utf-8",
        )
        return ["pipeline", p]

    case(
        "pipeline_duplicate_stage",
        pipeline_duplicate_stage,
        ["pipe.yaml:6", "duplicate key 'sft'"],
        [lambda d: d / "pipe_out"],
    )

    def pipeline_nan(d):
        path, _ = recipe(d)
        p = d / "pipe.yaml"
        p.write_text(
            f"output:\n  dir: {d / 'pipe_out'}\nstages:\n  sft:\n    recipe: {path}\n"
            "    train: {learning_rate: .inf}\n",
            encoding="utf-8",
        )
        return ["pipeline", p]

    case(
        "pipeline_non_finite",
        pipeline_nan,
        ["stage sft", "train.learning_rate", "not a finite number"],
        [lambda d: d / "pipe_out"],
    )

    def pipeline_pickled_base(d):
        path, _ = recipe(d)
        p = d / "pipe.yaml"
        p.write_text(
            f"output:\n  dir: {d / 'pipe_out'}\nstages:\n  dpo:\n    recipe: {path}\n"
            f"    model: {{name_or_path: {adapters['pickled']}}}\n",
            encoding="utf-8",
        )
        return ["pipeline", p]

    case(
        "pipeline_pickled_adapter",
        pipeline_pickled_base,
        ["adapter_model.bin", "pickle", "allow_pickle"],
        [lambda d: d / "pipe_out"],
    )

    # data preview
    case(
        "preview_max_length_zero",
        ["data", "preview", "alpaca_en_demo", "--model", "tiny-llama", "--max-length", "0"],
        ["--max-length", "at least 1"],
    )
    case("preview_missing_file", ["data", "preview", "nope.jsonl", "--model", "tiny-llama"], ["nope.jsonl"])

    # eval
    case(
        "eval_history_is_dir",
        lambda d: ["eval", "tiny-llama", "--data", "alpaca_en_demo", "--history", d, "--out", d / "ev"],
        ["--history", "is a directory"],
        [lambda d: d / "ev"],
    )
    case(
        "eval_baseline_missing",
        lambda d: ["eval", "tiny-llama", "--data", "alpaca_en_demo", "--baseline", d / "nope", "--out", d / "ev"],
        ["--baseline", "nope"],
        [lambda d: d / "ev"],
    )

    def suite_garbage(d):
        s = d / "suite.yaml"
        s.write_bytes(bytes(range(256)))
        return ["eval", "tiny-llama", "--suite", s, "--out", d / "ev"]

    case("eval_suite_binary", suite_garbage, ["suite.yaml"], [lambda d: d / "ev"])
    case(
        "eval_max_new_tokens_zero",
        lambda d: ["eval", "tiny-llama", "--data", "alpaca_en_demo", "--max-new-tokens", "0", "--out", d / "ev"],
        ["--max-new-tokens", "at least 1"],
        [lambda d: d / "ev"],
    )
    case(
        "eval_pickled_adapter",
        lambda d: [
            "eval",
            adapters["pickled"],
            "--data",
            "alpaca_en_demo",
            "--max-samples",
            "1",
            "--history",
            "none",
            "--out",
            d / "ev",
        ],
        ["adapter_model.bin", "pickle", "--allow-pickle"],
        [lambda d: d / "ev"],
    )

    # merge
    case(
        "merge_truncated",
        lambda d: ["merge", adapters["truncated"], "--out", d / "m"],
        ["adapter_model.safetensors", "truncated"],
        [lambda d: d / "m"],
    )
    case(
        "merge_pickled",
        lambda d: ["merge", adapters["pickled"], "--out", d / "m"],
        ["adapter_model.bin", "pickle", "--allow-pickle"],
        [lambda d: d / "m"],
    )
    case(
        "merge_negative_tolerance",
        lambda d: ["merge", adapters["good"], "--out", d / "m", "--tolerance", "-1"],
        ["--tolerance", "at least 0"],
        [lambda d: d / "m"],
    )
    case(
        "merge_out_inside_adapter",
        lambda d: ["merge", adapters["good"], "--out", adapters["good"] / "merged"],
        ["--out", "inside the adapter dir"],
        [adapters["good"] / "merged"],
    )
    case(
        "merge_missing_adapter",
        lambda d: ["merge", d / "nope", "--out", d / "m"],
        ["ADAPTER_DIR", "nope"],
        [lambda d: d / "m"],
    )

    # export
    case(
        "export_truncated",
        lambda d: ["export", adapters["truncated"], "--out", d / "m.gguf"],
        ["adapter_model.safetensors", "truncated"],
        [lambda d: d / "m.gguf"],
    )

    def export_parent_file(d):
        (d / "afile").write_text("x", encoding="utf-8")
        return ["export", tiny_path, "--out", d / "afile" / "m.gguf"]

    case("export_out_parent_is_file", export_parent_file, ["afile"], [lambda d: d / "afile" / "m.gguf"])
    case(
        "export_pickled",
        lambda d: ["export", adapters["pickled"], "--format", "safetensors", "--out", d / "m"],
        ["adapter_model.bin", "--allow-pickle"],
        [lambda d: d / "m"],
    )

    # chat
    case(
        "chat_negative_max_new_tokens",
        ["chat", tiny_path, "--prompt", "hi", "--max-new-tokens", "-5"],
        ["--max-new-tokens", "at least 1"],
    )
    case("chat_negative_temperature", ["chat", tiny_path, "--prompt", "hi", "--temperature", "-1"], ["--temperature"])
    case("chat_top_p_zero", ["chat", tiny_path, "--prompt", "hi", "--temperature", "0.7", "--top-p", "0"], ["--top-p"])
    case(
        "chat_truncated", ["chat", adapters["truncated"], "--prompt", "hi"], ["adapter_model.safetensors", "truncated"]
    )
    case("chat_pickled", ["chat", adapters["pickled"], "--prompt", "hi"], ["adapter_model.bin", "--allow-pickle"])
    case("chat_missing_dir", lambda d: ["chat", d / "nope", "--prompt", "hi"], ["nope", "no such directory"])

    # score
    case(
        "score_batch_size_zero",
        lambda d: ["score", d, "--data", "preference_en_demo", "--batch-size", "0"],
        ["--batch-size", "at least 1"],
    )
    case(
        "score_not_rm",
        lambda d: ["score", adapters["good"], "--data", "preference_en_demo", "--out", d / "s.jsonl"],
        ["reward model"],
        [lambda d: d / "s.jsonl"],
    )
    case("score_pickled", lambda d: ["score", adapters["pickled"], "--data", "preference_en_demo"], ["adapter"])

    def score_parent_file(d):
        (d / "afile").write_text("x", encoding="utf-8")
        return ["score", adapters["good"], "--data", "preference_en_demo", "--out", d / "afile" / "s.jsonl"]

    case("score_out_parent_is_file", score_parent_file, ["--out", "afile"], [lambda d: d / "afile" / "s.jsonl"])

    def eval_parent_file(d):
        (d / "afile").write_text("x", encoding="utf-8")
        return ["eval", "tiny-llama", "--data", "alpaca_en_demo", "--out", d / "afile" / "ev"]

    case("eval_out_parent_is_file", eval_parent_file, ["--out", "afile"], [lambda d: d / "afile" / "ev"])
    return cases, adapters["marker"]


def _run_batches(root: Path, cases: list[dict]) -> dict[str, dict]:
    """Run `cases` ({name, cwd, argv}) in BATCHES concurrent tests/_cli_batch.py processes: name -> result."""
    env = _env()
    batches = [cases[i::BATCHES] for i in range(BATCHES)]

    def run(i: int) -> dict:
        spec, results = root / f"batch{i}.json", root / f"results{i}.json"
        spec.write_text(json.dumps(batches[i]), encoding="utf-8")
        r = subprocess.run(
            [sys.executable, str(REPO / "tests" / "_cli_batch.py"), str(spec), str(results)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(results.read_text(encoding="utf-8"))

    with ThreadPoolExecutor(max_workers=BATCHES) as pool:
        return {k: v for part in pool.map(run, range(BATCHES)) for k, v in part.items()}


@pytest.fixture(scope="module")
def batched(tmp_path_factory, tiny_path) -> tuple[dict[str, Case], tuple[dict, dict, Path]]:
    """Both parts' cases, run together (one torch import per batch): (the first part's cases with their
    results, the catalogue)."""
    root = tmp_path_factory.mktemp("bad_input")
    cases = _cases(root / "cases")
    catalogue, marker = _catalogue(root, tiny_path)
    first = [{"name": c.name, "cwd": str(c.cwd), "argv": c.argv} for c in cases.values()]
    assert not {c["name"] for c in first} & {c["name"] for c in catalogue}
    results = _run_batches(root, first + catalogue)
    for case in cases.values():
        r = results[case.name]
        case.result = subprocess.CompletedProcess(case.argv, r["returncode"], r["stdout"], r["stderr"])
    return cases, ({c["name"]: c for c in catalogue}, results, marker)


@pytest.fixture(scope="module")
def catalogue(batched) -> tuple[dict, dict, Path]:
    return batched[1]


CATALOGUE_SIZE = 45  # and the subprocess cases above: 60 bad inputs over every command


def test_catalogue_covers_every_command(catalogue):
    cases, _, _ = catalogue
    assert len(cases) >= CATALOGUE_SIZE
    commands = {c["argv"][0] for c in cases.values()}
    assert commands == {"train", "pipeline", "data", "eval", "merge", "export", "chat", "score"}


def test_catalogue_case_is_one_line_exit_2_and_leaves_nothing(catalogue):
    cases, results, marker = catalogue
    failures = []
    for name, case in cases.items():
        r = results[name]
        errors = [line for line in r["stderr"].splitlines() if line.startswith(ERROR)]
        problems = []
        if r["returncode"] != 2:
            problems.append(f"exit {r['returncode']}")
        if "Traceback" in r["stderr"]:
            problems.append("traceback")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        else:
            problems += [f"{part!r} missing" for part in case["expect"] if part not in errors[0]]
        problems += [f"{p} left behind" for p in case["leaves"] if Path(p).exists()]
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n    {r['stderr'].strip()[-1500:]}")
    assert not marker.exists(), "a planted pickle was unpickled"
    assert not failures, "\n".join(failures)
