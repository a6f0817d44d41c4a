"""Will it fit (`finetune fit`, finetune/fit.py): the exact parts equal the bytes of the tensors that loading and
one optimizer step really create, for several architectures and quantizations; the activation model follows
torch's measured peak on CPU; the verdict and its first change are right for real model shapes."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from finetune import adapters, cli, config, fit, loading

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "fixtures" / "configs"


def tiny_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3MoeConfig

    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=320)
    if kind == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if kind == "qwen2-tied":
        return Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "qwen3-moe":
        return Qwen3MoeConfig(
            **common, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48
        )
    raise ValueError(kind)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fit-models")
    dirs = {}
    for kind in ("llama", "qwen2-tied", "qwen3-moe"):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_config(kind)).save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


def recipe_for(model_dir, adapter: dict, train: dict | None = None, model: dict | None = None):
    if adapter["method"] != "full":
        adapter = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", **adapter}
    text = yaml.safe_dump(
        {
            "stage": "sft",
            "model": {"name_or_path": str(model_dir), **(model or {})},
            "adapter": adapter,
            "data": {"train": "alpaca_en_demo"},
            "train": {"bf16": False, "per_device_train_batch_size": 2, "max_length": 64, **(train or {})},
            "output": {"dir": "/nonexistent/fit-test"},
        }
    )
    return config.load(text=text)


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def quant_state_tensors(p):
    qs = getattr(p, "quant_state", None)
    if qs is None:
        return []
    out = [qs.absmax, qs.code, qs.offset]
    if qs.state2 is not None:
        out += [qs.state2.absmax, qs.state2.code]
    return out


CASES = [
    ("llama", {"method": "lora"}, {}),
    ("qwen2-tied", {"method": "lora"}, {"dtype": "bfloat16"}),
    ("qwen3-moe", {"method": "lora"}, {}),
    ("llama", {"method": "full"}, {}),
    ("llama", {"method": "qlora", "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}, {}),
    ("qwen2-tied", {"method": "qlora", "quant_type": "fp4", "double_quant": False, "compute_dtype": "bfloat16"}, {}),
]


@pytest.mark.parametrize(
    ("kind", "adapter", "model"), CASES, ids=[f"{k}-{a['method']}-{i}" for i, (k, a, _) in enumerate(CASES)]
)
def test_weights_adapter_gradients_and_optimizer_are_the_bytes_really_created(model_dirs, kind, adapter, model):
    from peft import get_peft_model

    recipe = recipe_for(model_dirs[kind], adapter, model=model)
    est = fit.estimate(recipe, on_gpu=False)

    loaded = loading.load_for_training(recipe.model, recipe.adapter)
    if adapters.is_adapter(recipe.adapter.method):
        loaded = get_peft_model(loaded, adapters.peft_config(recipe.adapter, loaded))
    else:
        loaded.requires_grad_(True)
    params = list(loaded.parameters())
    frozen = [p for p in params if not p.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    held = storage_bytes([*frozen, *loaded.buffers(), *(t for p in frozen for t in quant_state_tensors(p))])
    assert est.part("weights") == held
    assert est.part("trainable") == storage_bytes(trainable)

    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 320, (2, 16))
    loaded(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert est.part("gradients") == storage_bytes([p.grad for p in trainable])
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    assert est.part("optimizer") == storage_bytes(states)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the context (any device), tensors that exist before it
    (weights) excluded: torch's own count of what a forward and backward hold, on a CPU."""

    def __init__(self, existing=()):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or key in self.existing or storage.nbytes() == 0:
                    continue
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out


def test_the_peak_tracker_counts_what_is_alive():
    with PeakMemory() as pm:
        a = torch.ones(1000)
        b = torch.ones(1000)
        del a
        c = torch.ones(2000)
    assert (pm.peak, pm.current) == (12000, 12000)
    del b, c


SIZES = [  # (layers, hidden, intermediate, heads, kv heads, vocab, batch, length, checkpointing, attention)
    (2, 128, 344, 4, 2, 1000, 2, 128, False, "sdpa"),
    (4, 128, 344, 4, 2, 1000, 2, 128, False, "sdpa"),
    (2, 256, 688, 8, 2, 1000, 2, 128, False, "sdpa"),
    (2, 128, 344, 4, 2, 4000, 4, 128, False, "sdpa"),
    (4, 128, 344, 4, 2, 1000, 2, 256, True, "sdpa"),
    (2, 256, 688, 8, 8, 1000, 2, 256, False, "eager"),
]


@pytest.mark.parametrize(
    "size", SIZES, ids=lambda s: "L{}-h{}-V{}-b{}x{}-{}{}".format(*s[:1], s[1], *s[5:8], "ckpt-" if s[8] else "", s[9])
)
def test_the_activation_model_follows_torchs_measured_peak(tmp_path, size):
    """Within 15% of what a LoRA forward + backward holds beyond the weights, in fp32 on CPU, over depth, width,
    vocabulary, tokens, checkpointing and eager attention."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    layers, hidden, inter, heads, kv, vocab, batch, length, ckpt, attn = size
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    recipe = recipe_for(
        tmp_path,
        {"method": "lora", "r": 8},
        {"per_device_train_batch_size": batch, "max_length": length, "activation_checkpointing": ckpt},
        {"attn_implementation": attn},
    )
    expected, _ = fit.activation_bytes(fit.Shape.of(cfg), recipe, torch.float32, attn)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, adapters.peft_config(recipe.adapter, model))
    model.train()
    ids = torch.randint(0, vocab, (batch, length))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with PeakMemory([*model.parameters(), *model.buffers()]) as pm:
        model(input_ids=ids, labels=ids).loss.backward()
    measured = pm.peak - trainable  # the gradients of the adapter are not activations
    assert expected == pytest.approx(measured, rel=0.15), (expected, measured)


def real(name: str) -> str:
    return f"model.name_or_path={CONFIGS / name}"


def run_fit(capsys, *args) -> tuple[int, str]:
    code = cli.main(["fit", *args])
    return code, capsys.readouterr().out


def test_a_7b_qlora_recipe_on_24gb_and_80gb(capsys):
    code, out = run_fit(capsys, "recipes/qwen2.5/sft_qlora.yaml", real("qwen2.5-7b-instruct"), "--gpu-memory", "24GB")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines()[1:8])
    assert set(lines) == {"weights", "trainable", "gradients", "optimizer", "activations", "framework", "total"}
    # 4-bit linear layers plus fp32 embeddings and lm_head (2 x 152064 x 3584 x 4 bytes = 4.06 GiB)
    assert 6.5 < float(lines["weights"].split()[0]) < 8.0
    assert "does not fit" in out and "first change that fits: train.per_device_train_batch_size=2" in out
    code, out = run_fit(capsys, "recipes/qwen2.5/sft_qlora.yaml", real("qwen2.5-7b-instruct"), "--gpu-memory", "80GB")
    assert out.strip().splitlines()[-1].startswith("fits: peak ~")


def test_the_first_change_is_qlora_where_the_weights_are_what_does_not_fit(capsys):
    code, out = run_fit(
        capsys,
        "recipes/llama3/sft_lora.yaml",
        real("llama-3.1-8b-instruct"),
        "train.per_device_train_batch_size=1",
        "train.max_length=512",
        "--gpu-memory",
        "16GB",
    )
    assert code == 0 and out.strip().splitlines()[-1].endswith("first change that fits: adapter.method=qlora"), out


def test_sharding_divides_what_it_shards():
    recipe = config.load("recipes/llama3/sft_lora.yaml", [real("llama-3.1-8b-instruct")])
    model = fit.meta_model(recipe)
    one = fit.estimate(recipe, model=model)
    zero2 = fit.estimate(recipe, world=4, sharding="zero2", model=model)
    full = fit.estimate(recipe, world=4, sharding="full", model=model)
    assert zero2.part("weights") == one.part("weights") and zero2.part("optimizer") == one.part("optimizer") // 4
    assert full.part("weights") == one.part("weights") // 4
    assert full.part("activations") == one.part("activations")


def test_bad_sizes_are_one_line(capsys):
    code = cli.main(["fit", "recipes/tiny/sft_lora.yaml", "--gpu-memory", "lots"])
    assert code == 2 and "--gpu-memory: 'lots' is not a size" in capsys.readouterr().err


REAL_CONFIGS = {  # the hub ids the shipped recipes name -> the vendored config of that model
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b-instruct",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5-1.5b-instruct",
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b-instruct",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b-instruct",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3.1-8b-instruct",
}


def shipped_recipes():
    """Every shipped recipe whose model is the tiny one, a chained stage or a model whose config is vendored; the
    2026 families' recipes are estimated on a tiny model of their architecture by their dry-run test
    (tests/test_families_2026.py), whose plan carries the memory line."""
    for path in sorted((REPO / "recipes").glob("*/*.yaml")):
        if path.parent.name in ("accelerate", "pipelines"):
            continue
        name = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["name_or_path"]
        if name.startswith(("tiny-", "outputs/")) or name in REAL_CONFIGS:
            yield path


@pytest.mark.parametrize("path", list(shipped_recipes()), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_gets_an_estimate(capsys, path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    name = raw["model"]["name_or_path"]
    overrides = []
    if name.startswith("outputs/"):  # a chained stage: the base it was trained on is the recipe family's model
        name = "Qwen/Qwen2.5-7B-Instruct" if "qwen" in path.parent.name else "meta-llama/Llama-3.1-8B-Instruct"
    if name in REAL_CONFIGS:
        overrides.append(real(REAL_CONFIGS[name]))
    code, out = run_fit(capsys, str(path), *overrides, "--gpu-memory", "80GB")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[-1].startswith(("fits: peak ~", "does not fit: peak ~")), out
    assert len(set(lines)) == len(lines), out  # each part and note once


def test_the_readme_recipe_table_shows_fits_estimates():
    """The peak GPU memory in the README's recipe table is `finetune fit`'s estimate of the row's first recipe."""
    import re

    rows = [line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines() if " GiB" in line]
    checked = 0
    for row in rows:
        m = re.match(r"\| `(recipes/[\w.]+/\w+\.yaml)`.* \| ([\d.]+) GiB", row)
        if not m:
            continue
        path, shown = m.group(1), float(m.group(2))
        name = yaml.safe_load((REPO / path).read_text(encoding="utf-8"))["model"]["name_or_path"]
        if name.startswith("outputs/"):
            name = "Qwen/Qwen2.5-7B-Instruct" if "qwen" in path else "meta-llama/Llama-3.1-8B-Instruct"
        recipe = config.load(REPO / path, [real(REAL_CONFIGS[name])])
        assert round(fit.estimate(recipe).total / fit.GIB, 1) == shown, path
        checked += 1
    assert checked >= 15


def test_the_gpu_comparison_refuses_cleanly_without_cuda():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fit_gpu.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "bench/fit_gpu.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured"
    ]


def test_the_dry_run_plan_says_whether_it_fits(capsys):
    code = cli.main(["train", "recipes/tiny/sft_lora.yaml", "--dry-run", "--gpu-memory", "8GB"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("  memory "))
    assert code == 0 and "fits: peak ~" in line and "of 8.00 GiB per device" in line
    code = cli.main(["train", "recipes/tiny/sft_lora.yaml", "--dry-run", "--gpu-memory", "100MB"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  memory "))
    assert code == 0 and line.split("memory", 1)[1].strip().startswith("does not fit: peak ~")
