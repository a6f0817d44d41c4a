"""`outputs.OutputDir`, the one reader of an output dir: a pipeline re-run with an `eval:` section
skips every stage (one identity for writing and comparing); a chained stage records its base by
content (base.json), names the original model (not this machine's cache) in its adapter config
and card, is rebuilt from that description when the cache and the dirs move, and refuses a
parent that was retrained since, naming both fingerprints."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from _support import memo_data

from finetune import loading, pipeline, tiny
from finetune.outputs import BASE_RECORD, OutputDir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    """out/sft (with an eval: section) -> out/dpo chained on it, trained once by a pipeline."""
    root = tmp_path_factory.mktemp("chained")
    data = memo_data(root)
    text = f"""\
output:
  dir: {root / "out"}
stages:
  sft:
    recipe: {REPO}/recipes/tiny/sft_lora.yaml
    data: {{train: {data}, format: messages, eval_ratio: 0.0}}
    train: {{max_steps: 3, per_device_train_batch_size: 4, report_to: []}}
    eval: {{data: {data}, max_samples: 2, max_new_tokens: 4, batch_size: 2}}
  dpo:
    recipe: {REPO}/recipes/tiny/dpo_lora.yaml
    model: {{name_or_path: "${{sft}}"}}
    data: {{max_samples: 8, eval_ratio: 0.0}}
    train: {{max_steps: 2, per_device_train_batch_size: 4, report_to: [], eval_strategy: "no"}}
"""
    path = root / "pipe.yaml"
    path.write_text(text)
    summary = pipeline.run(pipeline.load(path))
    assert {v["status"] for v in summary["stages"].values()} == {"trained"}
    return root, path


def test_rerun_of_a_pipeline_with_an_eval_section_skips_every_stage(chained):
    root, path = chained
    sft = OutputDir(root / "out" / "sft")
    assert (sft.path / "eval").is_dir() and "eval" in sft.recipe_dict()  # the section was run and recorded
    pipe = pipeline.load(path)
    assert [pipeline.status(stage) for stage in pipe.stages] == ["done", "done"]
    summary = pipeline.run(pipe)
    assert {v["status"] for v in summary["stages"].values()} == {"skipped"}
    # a changed eval: section does not change the training either
    assert [pipeline.status(s) for s in pipeline.load(path, ["sft.eval.max_new_tokens=5"]).stages] == ["done", "done"]


def logits(model_dir: str, adapter: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor([[1, 40, 50, 60, 70]])).logits


def test_chained_output_names_its_base_portably(chained):
    root, _ = chained
    sft, dpo = OutputDir(root / "out" / "sft"), OutputDir(root / "out" / "dpo")
    record = dpo.base_record()
    assert record["base"] == "tiny-llama" and record["fingerprint"] == sft.fingerprint()
    assert [(a["dir"], a["relative"]) for a in record["adapters"]] == [(str(sft.path), "../sft")]
    merged = str(loading.merged_copy(sft))
    assert dpo.base().where == merged
    cache = str(tiny.cache_root() / "merged")
    assert dpo.adapter_config()["base_model_name_or_path"] == tiny.build_if_tiny("tiny-llama")
    card = (dpo.path / "README.md").read_text()
    assert cache not in card and 'PeftModel.from_pretrained(base, "../sft").merge_and_unload()' in card
    # the card's plain transformers + peft recipe gives the model finetune loads
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dpo.adapter_config()["base_model_name_or_path"])
    base = PeftModel.from_pretrained(base, str(dpo.path / "../sft")).merge_and_unload()
    with torch.no_grad():
        by_card = PeftModel.from_pretrained(base, str(dpo.path))(torch.tensor([[1, 40, 50, 60, 70]])).logits
    assert torch.allclose(by_card, logits(merged, dpo.path), atol=1e-4)


def test_moved_outputs_and_cache_are_rebuilt_then_a_retrained_parent_is_named(chained, tmp_path):
    root, _ = chained
    expected = logits(str(loading.merged_copy(OutputDir(root / "out" / "sft"))), root / "out" / "dpo")
    sft_copy = OutputDir(root / "out" / "sft").fingerprint()  # its merged copy's name
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "out", moved)  # another machine: the original dirs and merged copies are gone
    (root / "out").rename(root / "away")
    for merged in (tiny.cache_root() / "merged").glob(sft_copy):
        shutil.move(merged, tmp_path / merged.name)
    try:
        source = loading.inspect(moved / "dpo")  # rebuilt from base.json: tiny-llama + ../sft
        assert source.base_field.endswith(BASE_RECORD + ": base")
        assert torch.allclose(logits(source.base, moved / "dpo"), expected, atol=1e-4)

        # "retrain" the parent: its adapter weights change
        old = OutputDir(moved / "sft").fingerprint()
        from safetensors.torch import load_file, save_file

        weights = load_file(moved / "sft" / "adapter_model.safetensors")
        save_file({k: v + 0.01 for k, v in weights.items()}, moved / "sft" / "adapter_model.safetensors")
        new = OutputDir(moved / "sft").fingerprint()
        assert new != old
        said = Said()
        logging.getLogger("finetune").addHandler(said)
        try:
            again = loading.inspect(moved / "dpo")  # the merge of what it trained on is still cached: used, and said
        finally:
            logging.getLogger("finetune").removeHandler(said)
        assert again.base == source.base and old in said.text and new in said.text
        shutil.rmtree(source.base)
        with pytest.raises(loading.ModelDirError, match=f"fingerprint {old}.*fingerprint {new}"):
            loading.inspect(moved / "dpo")
        shutil.rmtree(moved / "sft")
        with pytest.raises(loading.ModelDirError, match=r"its base is tiny-llama \+ .*sft merged"):
            loading.inspect(moved / "dpo")
    finally:
        (root / "away").rename(root / "out")
        for merged in tmp_path.glob(sft_copy):
            target = tiny.cache_root() / "merged" / merged.name
            if not target.exists():
                shutil.move(merged, target)


class Said(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"


def test_output_dir_reads_what_a_dir_holds(chained):
    root, _ = chained
    sft = OutputDir(root / "out" / "sft")
    assert sft.finished and sft.is_adapter and not sft.is_model and sft.method == "lora"
    assert sft.quantization() is None and sft.base_record() is None
    assert sft.base().where == tiny.build_if_tiny("tiny-llama")
    assert sft.model_section().name_or_path == "tiny-llama"
    recipe = sft.recipe()
    assert recipe.stage == "sft" and json.dumps(sft.identity()) == json.dumps(sft.identity())
    import yaml

    assert sft.identity() == yaml.safe_load(recipe.identity())  # the same function writes and compares
