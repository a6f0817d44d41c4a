"""Each adapter method learns memorisable data, changes exactly its trainable parameters,
and reloads in plain transformers + peft with the logits it had at the end of training."""

import json

import pytest
import torch
from _support import Watcher, logged_losses, memo_recipe, probe_inputs
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from finetune import config, loading
from finetune.stages import sft

CASES = {
    "lora": ("lora", {}),
    "rslora": ("lora", {"use_rslora": True}),
    "dora": ("dora", {}),
    "qlora": ("qlora", {}),
}


def _load_base(adapter_dir, method):
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    quant = None
    if method == "qlora":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quant, device_map={"": "cpu"} if quant else None
    )


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_learns_changes_its_parameters_and_reloads(tmp_path, case):
    method, extra = CASES[case]
    recipe = config.load(text=memo_recipe(tmp_path, method, adapter=extra))
    tok = AutoTokenizer.from_pretrained(loading.model_path(recipe.model))
    watcher = Watcher(tok)
    out = sft.run(recipe, callbacks=[watcher])

    losses = logged_losses(out)
    assert losses[-1] < 0.5 * losses[0], f"{case}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"

    assert watcher.before_trainable, "nothing was trainable"
    unchanged = [n for n, p in watcher.before_trainable.items() if torch.equal(p, watcher.after[n])]
    assert not unchanged, f"trainable parameters that did not move: {unchanged[:5]}"
    moved_frozen = [n for n, p in watcher.before_frozen.items() if not torch.equal(p, watcher.after[n])]
    assert not moved_frozen, f"frozen parameters that moved: {moved_frozen[:5]}"
    names = " ".join(watcher.before_trainable)
    assert "lora_A" in names and "lora_B" in names
    if method == "dora":
        assert "lora_magnitude_vector" in names

    model = PeftModel.from_pretrained(_load_base(out, method), out)
    model.eval()
    with torch.no_grad():
        reloaded = model(**probe_inputs(tok)).logits.float()
    assert torch.allclose(reloaded, watcher.logits, atol=1e-5), (reloaded - watcher.logits).abs().max()
