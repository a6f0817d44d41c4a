"""The families released in 2025-2026, as tiny random models built from transformers' own config classes
(bench/model_matrix.py's FAMILIES): SFT LoRA lowers the loss, the verified merge holds in fp32, greedy generation
with the cache equals generation without it, and what the server answers equals `finetune chat`. Hybrid caches
(linear attention / SSM beside attention, or recurrent layers only) are the bug class: nothing here is keyed on a
family's name, the families only prove that the mechanisms are general."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import model_matrix  # noqa: E402

from finetune import adapters, config, merge  # noqa: E402
from finetune.config import AdapterSection  # noqa: E402
from finetune.errors import RecipeError  # noqa: E402
from finetune.generate import cache_tracks_length, generate  # noqa: E402

# a cut-down Qwen3.5 whose two layers are both linear attention (the default layer pattern cut at two layers):
# its cache has no attention layer, which transformers' cached generation needs
ALL_LINEAR = ("qwen3_5_text", {**model_matrix.FAMILIES["Qwen3.5"][1], "layer_types": ["linear_attention"] * 2})
FAMILIES = {**model_matrix.FAMILIES, "Qwen3.5 (linear attention only)": ALL_LINEAR}
UNDER_TEST = [
    "Qwen3.5",
    "Qwen3.5 (linear attention only)",
    "Qwen3-Next",
    "Granite 4 (hybrid)",
    "Kimi Linear",
    "Falcon-H1",
    "LFM2",
    "Gemma 4 (text)",
    "GLM-4.7-Flash (MLA+MoE)",
]


def _model(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = FAMILIES[family]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**model_matrix.SMALL, **overrides}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """family -> (adapter dir, losses, merge report, merged dir), trained once per family on first use."""
    root, done = tmp_path_factory.mktemp("families"), {}

    def run(family: str):
        if family not in done:
            from finetune.stages import sft

            slug = FAMILIES[family][0] + ("-linear" if family.endswith("only)") else "")
            model_dir = root / "models" / slug
            _model(family).save_pretrained(str(model_dir))
            tiny_tokenizer.save_pretrained(str(model_dir))
            work = root / "runs" / slug
            work.mkdir(parents=True)
            recipe = model_matrix.recipe(model_dir, work, "sft", "lora").replace("max_steps: 2", "max_steps: 3")
            with contextlib.redirect_stdout(sys.stderr):
                out = sft.run(config.load(text=recipe))
            report = merge.merge(str(out), str(root / "merged" / slug), "float32")
            done[family] = (out, model_matrix._losses(out), report, root / "merged" / slug)
        return done[family]

    return run


@pytest.mark.parametrize("family", UNDER_TEST)
def test_family_trains_merges_and_generates_the_same_with_and_without_the_cache(family, runs):
    out, losses, report, merged = runs(family)
    assert losses[-1] < losses[0], losses
    assert report.max_delta <= 1e-5
    prompt_length, cached, uncached, merged_tokens = model_matrix.greedy_three_ways(out, merged)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, merged_tokens)  # the merged model answers the same
    assert cached.shape[1] > prompt_length


@pytest.mark.parametrize("family", ["Qwen3.5", "Qwen3.5 (linear attention only)", "Falcon-H1"])
def test_served_answer_equals_finetune_chat(family, runs):
    expected, served = model_matrix.served_and_chat_answers(runs(family)[0])
    assert expected and served == expected


def test_a_cache_of_recurrent_layers_only_is_generated_without_it():
    """The bug class itself: transformers' cached generation stops on a cache without an attention layer."""
    model = _model("Qwen3.5 (linear attention only)").eval()
    assert not cache_tracks_length(model) and cache_tracks_length(_model("Qwen3.5"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="get_seq_length"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        assert generate(model, ids, max_new_tokens=4, do_sample=False).shape == (1, 8)


def _wrapped(model, targets) -> set[str]:
    from peft import get_peft_model

    lora = get_peft_model(
        model, adapters.peft_config(AdapterSection(method="lora", r=2, target_modules=targets), model)
    )
    return {
        n.removesuffix(".base_layer").split(".layers.")[1]
        for n, _ in lora.named_modules()
        if n.endswith(".base_layer")
    }


@pytest.mark.parametrize(
    "family,mixer,kept",
    [
        ("Falcon-H1", "mamba", {"self_attn.q_proj", "feed_forward.down_proj"}),
        ("Qwen3.5", "linear_attn", {"self_attn.o_proj", "mlp.up_proj"}),
        ("Granite 4 (hybrid)", "mamba", {"self_attn.v_proj", "shared_mlp.output_linear"}),
        ("LFM2", "conv", {"self_attn.out_proj", "feed_forward.w2"}),
        ("Kimi Linear", "self_attn", set()),  # KDA sits at self_attn in layer 0: only layer 1's MLA attention
    ],
)
def test_all_linear_wraps_attention_and_mlp_but_not_the_recurrent_mixer(family, mixer, kept):
    wrapped = _wrapped(_model(family), "all-linear")
    assert not any(name.startswith(f"0.{mixer}.") for name in wrapped), wrapped
    assert kept <= {name.split(".", 1)[1] for name in wrapped}
    assert any(".q_proj" in n or ".q_a_proj" in n for n in wrapped)


def test_a_named_mixer_projection_trains_where_peft_and_the_kernels_allow_it():
    wrapped = _wrapped(_model("Qwen3.5"), ["in_proj_qkv", "out_proj"])  # GatedDeltaNet calls both as modules
    assert wrapped == {"0.linear_attn.in_proj_qkv", "0.linear_attn.out_proj"}
    assert _wrapped(_model("Granite 4 (hybrid)"), ["in_proj"]) == {"0.mamba.in_proj"}
    for family in ("Falcon-H1", "Granite 4 (hybrid)"):  # PEFT refuses Falcon-H1's only; both kernels skip a LoRA
        with pytest.raises(RecipeError, match=r"^adapter.target_modules: mamba.out_proj is the output projection"):
            adapters.peft_config(AdapterSection(method="lora", target_modules=["q_proj", "out_proj"]), _model(family))


@pytest.mark.parametrize(
    "family,method,why",
    [
        ("Qwen3.5", "prefix_tuning", "linear-attention/SSM state"),
        ("LFM2", "prefix_tuning", "linear-attention/SSM state"),
        ("Gemma 4 (text)", "prompt_tuning", "per-layer embeddings"),
        ("Falcon-H1", "p_tuning", "does not take"),
    ],
)
def test_prompt_learning_that_cannot_work_is_refused_in_one_line(family, method, why):
    with pytest.raises(RecipeError, match=f"^adapter.method: {method} .*{why}") as e:
        adapters.peft_config(AdapterSection(method=method, num_virtual_tokens=4), _model(family))
    assert "\n" not in str(e.value)


def test_prompt_tuning_on_a_hybrid_cache_generates_the_same_with_and_without_it():
    import peft

    model = peft.get_peft_model(
        _model("Qwen3.5"), adapters.peft_config(AdapterSection(method="prompt_tuning", num_virtual_tokens=4), None)
    ).eval()
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
        ids = torch.tensor([[5, 6, 7, 8]])
        cached = generate(model, ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(
            cached, generate(model, ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
        )
        assert not torch.equal(cached, generate(model.get_base_model(), ids, max_new_tokens=6, do_sample=False))


def test_mla_config_with_fewer_kv_heads_than_heads_is_refused_in_one_line():
    """GLM-4.7-Flash's architecture (MLA + MoE) trains (above). The tensor-size mismatch seen in training came from
    the config: latent attention makes keys/values for every head, but transformers still repeats them by
    num_attention_heads / num_key_value_heads (a failure when head_dim also differs from qk_rope_head_dim)."""
    model_type, overrides = FAMILIES["GLM-4.7-Flash (MLA+MoE)"]
    from transformers import AutoConfig, AutoModelForCausalLM

    bad = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            model_type, **{**model_matrix.SMALL, **overrides, "num_key_value_heads": 2, "head_dim": 16}
        )
    )
    with pytest.raises(RuntimeError, match="size of tensor"):
        bad(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(RecipeError, match="^model: .*num_key_value_heads=2 but num_attention_heads=4"):
        adapters.peft_config(AdapterSection(method="lora"), bad)


TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "templates"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipe -> (the tiny model of its architecture, the vendored chat template of its family). GLM-4.5's and
# Llama 4's own templates are not among llama.cpp's templates in the llama-cpp-python sdists (0.3.16, 0.3.26,
# 0.3.36 checked): GLM-4.6's (the same GLM family, reasoning_content) and Llama 3.1's stand in for them.
FAMILY_RECIPES = {
    "qwen3.5/sft_lora.yaml": ("Qwen3.5", "Qwen3.5-4B.jinja"),
    "qwen3.5/sft_lora_thinking.yaml": ("Qwen3.5", "Qwen3.5-4B.jinja"),
    "qwen3-next/sft_qlora.yaml": ("Qwen3-Next", "Qwen-Qwen3-0.6B.jinja"),
    "gemma4/sft_lora.yaml": ("Gemma 4 (text)", "google-gemma-4-31B-it.jinja"),
    "glm4.5/sft_qlora.yaml": ("GLM-4.5 (MoE)", "GLM-4.6.jinja"),
    "gpt-oss/sft_lora.yaml": ("gpt-oss", "openai-gpt-oss-120b.jinja"),
    "llama4/sft_qlora.yaml": ("Llama 4 (text)", "meta-llama-Llama-3.1-8B-Instruct.jinja"),
    "deepseek-r1-distill/sft_lora.yaml": ("Qwen2", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"),
    "mistral/sft_lora.yaml": ("Mistral", "mistralai-Mistral-Nemo-Instruct-2407.jinja"),
}


@pytest.mark.parametrize("rel", sorted(FAMILY_RECIPES))
def test_family_recipe_dry_runs_on_a_tiny_model_of_its_architecture(rel, tmp_path, tiny_tokenizer):
    from finetune.stages import sft

    family, template = FAMILY_RECIPES[rel]
    path = RECIPES / rel
    first, gpu = path.read_text(encoding="utf-8").splitlines()[:2]
    assert first == f"# finetune train recipes/{rel}" and gpu.startswith("# GPU: ")
    model_dir = tmp_path / "model"
    _model(family).save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    recipe = config.load(
        path,
        [
            f"model.name_or_path={model_dir}",
            f"model.chat_template={TEMPLATES / template}",
            f"output.dir={tmp_path / 'out'}",
            "train.max_length=512",
        ],
    )
    plan = sft.plan(recipe).render()
    assert f"-> {model_dir}" in plan and recipe.adapter.method in plan
    assert " 0 trainable" not in plan and "tokens trained" in plan
    assert "  memory         " in plan and "peak ~" in plan  # finetune fit estimates this architecture
    assert not (tmp_path / "out").exists()


def test_the_plan_names_what_all_linear_wraps_layer_by_layer(tmp_path, tiny_tokenizer):
    """On a hybrid model `all-linear` is not PEFT's: the plan lists the wrapped modules per layer (attention
    only where the layer has it, the MLP in every layer, the linear-attention mixer nowhere)."""
    from finetune.stages import sft

    model_dir = tmp_path / "model"
    _model("Qwen3.5").save_pretrained(str(model_dir))  # layer 0 linear attention, layer 1 full attention
    tiny_tokenizer.save_pretrained(str(model_dir))
    recipe = config.load(
        RECIPES / "qwen3.5/sft_lora.yaml",
        [f"model.name_or_path={model_dir}", f"output.dir={tmp_path / 'out'}", "train.max_length=512"],
    )
    assert recipe.adapter.target_modules == "all-linear"
    lines = [line for line in sft.plan(recipe).render().splitlines() if line.startswith("  targets ")]
    assert lines == [
        "  targets        model.layers 0-1: mlp.down_proj, mlp.gate_proj, mlp.up_proj; "
        "model.layers 1: self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, self_attn.v_proj"
    ]
