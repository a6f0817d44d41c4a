"""`finetune merge`: merged models reproduce their adapter models (checked independently of finetune's
own check), QLoRA merges both ways with their deviation from the 4-bit model, multi-adapter
combinations, and bad input as one-line errors with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from _merge_support import logits, lora, make_adapter, other_base, set_base
from peft import IA3Config, LoHaConfig, PeftModel, PromptTuningConfig, VeraConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from finetune import cli, merge
from finetune.errors import FinetuneError


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora": make_adapter(tiny_path, root / "lora", lora(), seed=0),
        "lora_b": make_adapter(tiny_path, root / "lora_b", lora(), seed=1),
        "dora": make_adapter(tiny_path, root / "dora", lora(use_dora=True), seed=2),
        "ia3": make_adapter(
            tiny_path,
            root / "ia3",
            IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                init_ia3_weights=False,
            ),
        ),
        "loha": make_adapter(
            tiny_path, root / "loha", LoHaConfig(r=4, target_modules="all-linear", init_weights=False)
        ),
        "vera": make_adapter(
            tiny_path, root / "vera", VeraConfig(r=16, target_modules=["q_proj", "o_proj"], init_weights=False)
        ),
        "prompt": make_adapter(
            tiny_path, root / "prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        ),
    }


@pytest.fixture(scope="module")
def base_model(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)


def adapter_logits(tiny_path, adapter_dir, tok):
    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(adapter_dir)), tok)


PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out)
enc = tok.apply_chat_template([{"role": "user", "content": "What colour is the sky?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
with torch.no_grad():
    torch.save(model(input_ids=enc["input_ids"]).logits.float(), sys.argv[2])
assert "finetune" not in sys.modules and "peft" not in sys.modules
"""


def test_lora_merge_loads_in_plain_transformers_with_the_adapter_logits(
    tmp_path, adapters, tiny_path, tiny_tokenizer, base_model
):
    out = tmp_path / "merged"
    report = merge.merge(str(adapters["lora"]), str(out))
    assert report.max_delta <= 1e-4
    files = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "merge_report.json",
    } <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))] and not list(tmp_path.glob(".merged.tmp-*"))
    assert "adapter_config.json" not in files

    r = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(out), str(tmp_path / "l.pt")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    merged = torch.load(tmp_path / "l.pt")
    expected = adapter_logits(tiny_path, adapters["lora"], tiny_tokenizer)
    assert (merged - expected).abs().max() <= 1e-4
    assert (expected - logits(base_model, tiny_tokenizer)).abs().max() > 0.1, "the adapter changes the model"
    card = (out / "README.md").read_text()
    assert "max |Δlogit|" in card and str(adapters["lora"]) in card


@pytest.mark.parametrize(
    "name,dtype,tol",
    [
        ("dora", "float32", 1e-4),
        ("ia3", "float32", 1e-4),
        ("loha", "float32", 1e-4),
        ("vera", "float32", 1e-4),
        ("lora", "bfloat16", 0.5),
    ],
)
def test_other_methods_and_dtypes_merge_within_tolerance(
    tmp_path, adapters, tiny_path, tiny_tokenizer, name, dtype, tol
):
    out = tmp_path / "merged"
    report = merge.merge(str(adapters[name]), str(out), dtype=dtype, max_shard_size="1MB")
    assert report.max_delta <= tol
    shards = list(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    dtypes = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as st:
            dtypes |= {st.get_tensor(k).dtype for k in st.keys()}
    assert dtypes == {getattr(torch, dtype)}
    written = logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), tiny_tokenizer)
    expected = adapter_logits(tiny_path, adapters[name], tiny_tokenizer)
    assert (written - expected).abs().max() <= tol


def test_qlora_merges_both_ways_and_reports_the_deviation(tmp_path, tiny_path, tiny_tokenizer):
    from peft import LoraConfig

    adapter = make_adapter(
        tiny_path,
        tmp_path / "qlora",
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        qlora=True,
    )
    faithful = merge.merge(str(adapter), str(tmp_path / "deq"))  # default: onto the dequantized weights
    original = merge.merge(str(adapter), str(tmp_path / "orig"), onto="original")
    assert faithful.max_delta <= 1e-4 and original.max_delta <= 1e-4  # each merge reproduces its own adapter model
    deq, orig = faithful.deviations["dequantized"], original.deviations["original"]
    assert 0 < deq and deq * 5 < orig, (deq, orig)  # the faithful merge is far closer to what was trained
    assert json.loads((tmp_path / "deq" / "merge_report.json").read_text())["deviation_from_4bit_adapter_model"] == {
        "dequantized": deq
    }
    assert not json.loads((tmp_path / "deq" / "config.json").read_text()).get("quantization_config")
    # the two merges differ exactly in the base weights: dequantized 4-bit vs original
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "deq")).model.layers[0].self_attn.q_proj.weight
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "orig")).model.layers[0].self_attn.q_proj.weight
    base = AutoModelForCausalLM.from_pretrained(tiny_path).model.layers[0].self_attn.q_proj.weight
    assert 0 < (a - b).abs().max() < 0.5 * base.abs().max()

    (adapter / "recipe.yaml").unlink()  # another tool's QLoRA adapter: --onto assumes the usual NF4 + double quant
    other = merge.merge(str(adapter), str(tmp_path / "no_recipe"), onto="dequantized")
    assert abs(other.deviations["dequantized"] - deq) < 1e-6 and "no finetune recipe.yaml" in " ".join(other.notes)


def test_ties_and_dare_combinations_load_and_differ_from_a_plain_average(
    tmp_path, adapters, tiny_path, tiny_tokenizer
):
    pair = [str(adapters["lora"]), str(adapters["lora_b"])]
    merge.merge_adapters(pair, str(tmp_path / "avg"), method="cat", weights=[0.5, 0.5])
    average = adapter_logits(tiny_path, tmp_path / "avg", tiny_tokenizer)
    outputs = {}
    for method in ("ties", "dare_ties", "dare_linear"):
        report = merge.merge_adapters(pair, str(tmp_path / method), method=method, density=0.5)
        assert report.max_delta <= 1e-4
        outputs[method] = adapter_logits(tiny_path, tmp_path / method, tiny_tokenizer)  # plain peft loads it
        assert (outputs[method] - average).abs().max() > 0.05, method
    assert (
        outputs["dare_ties"] - outputs["ties"]
    ).abs().max() > 1e-3  # DARE's random drop is not TIES' magnitude trim

    into = merge.merge_adapters(pair, str(tmp_path / "ties_model"), method="ties", density=0.5, into_base=True)
    assert into.max_delta <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ties_model"))
    assert (logits(model, tiny_tokenizer) - outputs["ties"]).abs().max() <= 1e-4


def _cli_error(capsys, argv) -> str:
    """Run the CLI in-process (no subprocess start-up); leave the loggers as they were."""
    import logging

    from transformers.utils import logging as hf_logging

    log = logging.getLogger("finetune")
    saved = (list(log.handlers), log.propagate, log.level)
    hf_saved = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    capsys.readouterr()  # only what this command prints
    try:
        assert cli.main(argv) == 2
    finally:
        log.handlers[:], log.propagate, log.level = saved[0], saved[1], saved[2]
        hf_logging.set_verbosity(hf_saved[0])
        (hf_logging.enable_progress_bar if hf_saved[1] else hf_logging.disable_progress_bar)()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("finetune: error: "), err
    return err[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, adapters, tiny_path, capsys):
    out = tmp_path / "out"

    lost = tmp_path / "lost_base"
    shutil.copytree(adapters["lora"], lost)
    set_base(lost, str(tmp_path / "no" / "such" / "base"))
    line = _cli_error(capsys, ["merge", str(lost), "--out", str(out)])
    assert "base_model_name_or_path" in line and "not found" in line and "--base" in line

    other = other_base(tiny_path, tmp_path / "other_base")
    line = _cli_error(capsys, ["merge", str(adapters["lora"]), "--out", str(out), "--base", str(other)])
    assert "does not fit base" in line and "size mismatch" in line

    shallow = other_base(tiny_path, tmp_path / "shallow_base", hidden_size=128)  # same shapes, half the layers
    line = _cli_error(capsys, ["merge", str(adapters["dora"]), "--out", str(out), "--base", str(shallow)])
    assert "does not fit base" in line and "have no module in that model" in line and "layers.2." in line

    line = _cli_error(capsys, ["merge", str(adapters["prompt"]), "--out", str(out)])
    assert "PROMPT_TUNING" in line and "cannot be folded" in line and "PeftModel" in line

    moved = tmp_path / "other_adapter"
    shutil.copytree(adapters["lora_b"], moved)
    set_base(moved, str(other))
    line = _cli_error(
        capsys, ["merge", "--adapters", str(adapters["lora"]), str(moved), "--method", "ties", "--out", str(out)]
    )
    assert "same base" in line

    line = _cli_error(capsys, ["merge", "--adapters", str(adapters["lora"]), str(adapters["dora"]), "--out", str(out)])
    assert "DoRA" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _cli_error(capsys, ["merge", str(adapters["lora"]), "--out", str(out)])
    assert "exists" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".out.tmp-*"))


def test_a_failed_check_writes_nothing(tmp_path, adapters):
    with pytest.raises(FinetuneError, match="merge check failed"):
        merge.merge(str(adapters["lora"]), str(tmp_path / "out"), dtype="bfloat16", tolerance=1e-9)
    assert list(tmp_path.iterdir()) == []


def test_a_finetune_output_merges_by_its_recipe_when_the_recorded_base_moved(tmp_path, tiny_path, tiny_tokenizer):
    from _support import memo_recipe

    from finetune import config
    from finetune.stages import sft

    out = sft.run(
        config.load(text=memo_recipe(tmp_path, "lora", steps=3, adapter={"r": 4}, train={"learning_rate": 1e-2}))
    )
    trained = adapter_logits(tiny_path, out, tiny_tokenizer)
    set_base(out, str(tmp_path / "gone" / "tiny-llama"))  # e.g. another machine's cache path
    report = merge.merge(str(out), str(tmp_path / "merged"))  # recipe.yaml's `tiny-llama` resolves here
    assert report.max_delta <= 1e-4
    merged = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")), tiny_tokenizer)
    assert (merged - trained).abs().max() <= 1e-4


def test_dtype_auto_keeps_the_base_models_dtype(tmp_path, tiny_path, tiny_tokenizer):
    base = tmp_path / "bf16_base"
    AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16).save_pretrained(str(base))
    tiny_tokenizer.save_pretrained(str(base))
    adapter = make_adapter(str(base), tmp_path / "adapter", lora())
    report = merge.merge(str(adapter), str(tmp_path / "merged"))
    assert report.dtype == "bfloat16" and report.max_delta <= report.tolerance
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.bfloat16}
