"""The real CLI end to end on the quickstart recipe: a self-describing output dir that plain
transformers + peft load with no finetune import; dry runs; overwrite protection."""

import json
import shutil
import subprocess
import sys

from _support import REPO, logged_losses, run_cli, run_cli_in_process

from finetune import config

QUICKSTART = str(REPO / "recipes" / "tiny" / "sft_lora.yaml")

PLAIN_LOAD = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
out = sys.argv[1]
base = json.load(open(out + "/adapter_config.json"))["base_model_name_or_path"]
tok = AutoTokenizer.from_pretrained(out)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
ids = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
assert "finetune" not in sys.modules, "finetune was imported"
print("GENERATED", gen.shape[1] - ids["input_ids"].shape[1])
"""


def test_quickstart_recipe_trains_and_writes_a_self_describing_output(tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        [
            "train",
            QUICKSTART,
            f"output.dir={out}",
            "train.max_steps=15",
            "train.logging_steps=1",
            "train.save_steps=5",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"finetune: done: output in {out}" in r.stderr
    assert "Traceback" not in r.stderr

    files = {p.name for p in out.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "recipe.yaml",
        "README.md",
        "trainer_state.json",
        "all_results.json",
    } <= files
    assert "training_args.bin" not in files, "no pickle in the output"
    assert not any(name.startswith("checkpoint-") for name in files)
    assert not (tmp_path / "out.incomplete").exists()
    assert list((out / "runs").rglob("events.out.tfevents*")), "TensorBoard logs"

    tok_cfg = (
        (out / "chat_template.jinja").read_text()
        if (out / "chat_template.jinja").exists()
        else json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert "{% generation %}" in tok_cfg
    card = (out / "README.md").read_text()
    assert "tiny-llama" in card and "alpaca_en_demo" in card and "train_loss" in card and "learning_rate" in card
    saved = config.load(out / "recipe.yaml")
    assert saved.train["max_steps"] == 15 and saved.output.dir == str(out)

    losses = logged_losses(out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "GENERATED" in plain.stdout

    # A finished output is never overwritten silently; overwrite=true replaces it atomically.
    again = run_cli_in_process(["train", QUICKSTART, f"output.dir={out}", "train.max_steps=2"], cwd=tmp_path)
    assert again.returncode != 0 and "output.overwrite=true" in again.stderr
    assert len(logged_losses(out)) == len(losses)
    replaced = run_cli_in_process(
        [
            "train",
            QUICKSTART,
            f"output.dir={out}",
            "train.max_steps=2",
            "train.logging_steps=1",
            "output.overwrite=true",
        ],
        cwd=tmp_path,
    )
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert len(logged_losses(out)) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    # overrides after the option still apply (argparse alone would reject them)
    r = run_cli_in_process(["train", QUICKSTART, "--dry-run", f"output.dir={out}", "train.max_steps=3"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable of" in r.stdout and "examples from" in r.stdout and "per step" in r.stdout
    assert f"output         {out}" in r.stdout and "steps          3 " in r.stdout
    assert not out.exists() and not (tmp_path / "out.incomplete").exists()


def test_console_script_and_module_are_the_same_program(tmp_path):
    exe = shutil.which("finetune")
    assert exe, "the `finetune` console script is installed by `pip install -e .`"
    script = subprocess.run([exe, "--version"], capture_output=True, text=True)
    module = run_cli(["--version"], cwd=tmp_path)
    assert script.returncode == module.returncode == 0
    assert script.stdout == module.stdout and script.stdout.startswith("finetune ")
