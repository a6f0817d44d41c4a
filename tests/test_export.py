"""`finetune export`: the GGUF reads back (names, shapes, values within the outtype's tolerance, tokenizer
metadata), and a forward pass written the way llama.cpp computes (its RoPE conventions, from the
file's own metadata) gives transformers' logits, which shows the q/k permutation is right; the
Ollama Modelfile's template reproduces the chat template (executed by Go's text/template in
test_ollama_go.py)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from _gguf_forward import gguf_forward, read
from _merge_support import lora, make_adapter
from _support import run_cli, run_cli_in_process
from transformers import AutoModelForCausalLM, Qwen2Config

from finetune import gguf_export, ollama
from finetune.errors import FinetuneError
from finetune.export import export_gguf


def hf_logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def probe_ids(tiny_tokenizer):
    return tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What colour is the sky?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]


def test_gguf_f32_round_trip_and_llama_cpp_forward_match_transformers(tmp_path, tiny_path, tiny_tokenizer, probe_ids):
    out = tmp_path / "tiny.gguf"
    report = gguf_export.convert(Path(tiny_path), out, "f32")
    assert report.max_rel_error == 0.0
    tensors, meta, _ = read(out)
    hf = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    cfg = json.loads((Path(tiny_path) / "config.json").read_text())

    # names and shapes: one GGUF tensor per HF weight, q/k permuted (not copied), the rest equal
    assert len(tensors) == len(hf)
    assert np.array_equal(tensors["blk.0.ffn_down.weight"], hf["model.layers.0.mlp.down_proj.weight"].numpy())
    assert np.array_equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"].numpy())
    q, k = hf["model.layers.1.self_attn.q_proj.weight"].numpy(), hf["model.layers.1.self_attn.k_proj.weight"].numpy()
    assert (
        tensors["blk.1.attn_k.weight"].shape
        == k.shape
        == (cfg["num_key_value_heads"] * cfg["head_dim"], cfg["hidden_size"])
    )
    assert not np.array_equal(tensors["blk.1.attn_q.weight"], q)
    assert np.array_equal(gguf_export.unpermute(tensors["blk.1.attn_q.weight"], 4), q)
    assert np.array_equal(gguf_export.unpermute(tensors["blk.1.attn_k.weight"], 4, 2), k)

    # metadata as llama.cpp reads it
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == cfg["num_hidden_layers"]
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.rope.dimension_count"] == cfg["head_dim"]
    vocab = tiny_tokenizer.get_vocab()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    tj = json.loads((Path(tiny_path) / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in tj["model"]["merges"]]
    types = meta["tokenizer.ggml.token_type"]
    assert {types[i] for i in tiny_tokenizer.all_special_ids} == {gguf.TokenType.CONTROL}
    assert types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    assert meta["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id
    assert meta["tokenizer.chat_template"] == tiny_tokenizer.chat_template

    # the file computes what transformers computes (llama.cpp's adjacent-pair RoPE on the permuted rows)
    expected = hf_logits(tiny_path, probe_ids)
    assert np.abs(gguf_forward(out, probe_ids) - expected).max() < 1e-4


@pytest.mark.parametrize(
    "outtype,qtype", [("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)]
)
def test_gguf_outtypes_read_back_within_tolerance(tmp_path, tiny_path, probe_ids, outtype, qtype):
    out = tmp_path / f"tiny-{outtype}.gguf"
    report = gguf_export.convert(Path(tiny_path), out, outtype)
    assert 0 < report.max_rel_error <= gguf_export.TOLERANCE[outtype]
    _, _, types = read(out)
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    got, expected = gguf_forward(out, probe_ids), hf_logits(tiny_path, probe_ids)
    assert np.abs(got - expected).max() < {"f16": 0.02, "q8_0": 0.2}[outtype]


def test_qwen2_exports_unpermuted_with_biases(tmp_path, tiny_path, tiny_tokenizer, probe_ids):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=1536,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model_dir = tmp_path / "qwen2"
    model = AutoModelForCausalLM.from_config(cfg)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)  # non-zero q/k/v biases, so a wrong bias layout would show
    model.save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    gguf_export.convert(model_dir, tmp_path / "q.gguf", "f32")
    tensors, meta, _ = read(tmp_path / "q.gguf")
    assert meta["general.architecture"] == "qwen2" and "output.weight" not in tensors
    assert np.array_equal(
        tensors["blk.0.attn_q.weight"], model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    )
    assert "blk.0.attn_k.bias" in tensors
    assert np.abs(gguf_forward(tmp_path / "q.gguf", probe_ids) - hf_logits(model_dir, probe_ids)).max() < 1e-4


CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are Qwen.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CONTENT_DEPENDENT = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}{{ m['content'] }}"
    "{% else %}[{{ m['role'] }}] {{ m['content'] | upper }}\n{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template,stops,system",
    [
        (None, ["</s>", "<|user|>"], None),
        (CHATML, ["<|im_end|>", "<|im_start|>user"], "You are Qwen."),
        (LLAMA3.replace(" | trim", ""), ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>"], None),
    ],
    ids=["tiny", "chatml", "llama3-untrimmed"],
)
def test_ollama_template_reproduces_the_chat_template(tiny_tokenizer, template, stops, system):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    if template:
        tok.chat_template = template
    pieces = ollama.split_template(tok)
    chat = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "Sky?"},
    ]
    assert pieces.render(chat, True) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    text = ollama.modelfile("m.gguf", tok)
    assert text.splitlines()[1] == "FROM ./m.gguf"
    assert [
        line.split(" ", 2)[2].strip('"') for line in text.splitlines() if line.startswith("PARAMETER stop")
    ] == stops
    assert (f'SYSTEM """{system}"""' in text) == bool(system)
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert ('(ne .Role "system")' in go) == (system is not None)  # a default system turn is written when none is sent
    assert "if .System" not in go and "{{ .Content }}" in go and "$last" in go  # system turns come from .Messages
    assert pieces.bos not in go or not pieces.bos  # llama.cpp / Ollama add BOS themselves


def test_ollama_refuses_a_template_it_cannot_translate(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CONTENT_DEPENDENT
    with pytest.raises(ollama.TemplateError, match="cannot be translated"):
        ollama.modelfile("m.gguf", tok)


def test_export_cli_merges_an_adapter_and_writes_gguf_and_modelfile(tmp_path, tiny_path):
    adapter = make_adapter(tiny_path, tmp_path / "adapter", lora())
    r = run_cli(
        [
            "export",
            str(adapter),
            "--out",
            str(tmp_path / "out" / "model.gguf"),
            "--outtype",
            "q8_0",
            "--ollama",
            "--system",
            "Be brief.",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "merged on the fly" in r.stdout and "read back: names, shapes and metadata match" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "model.gguf"]  # no temp dir left
    assert 'SYSTEM """Be brief."""' in (tmp_path / "out" / "Modelfile").read_text()
    tensors, _, _ = read(tmp_path / "out" / "model.gguf")
    base = AutoModelForCausalLM.from_pretrained(tiny_path).model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert np.abs(tensors["blk.0.ffn_down.weight"] - base).max() > 0.01  # the adapter was merged in

    r = run_cli_in_process(["export", str(adapter), "--out", str(tmp_path / "out" / "model.gguf")], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "exists" in r.stderr

    # a folder that already has a Modelfile: refused, naming --modelfile; --modelfile elsewhere points FROM back
    out2 = tmp_path / "out" / "second.gguf"
    r = run_cli_in_process(["export", str(adapter), "--out", str(out2), "--ollama"], cwd=tmp_path)
    assert r.returncode == 2 and "--modelfile" in r.stderr and not out2.exists()
    other = tmp_path / "ollama" / "Modelfile.second"
    r = run_cli_in_process(
        ["export", str(adapter), "--out", str(out2), "--ollama", "--modelfile", str(other)], cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FROM ../out/second.gguf\n" in other.read_text() and (other.parent / "../out/second.gguf").resolve() == out2


def test_export_refuses_what_it_cannot_write(tmp_path, tiny_path):
    from peft import PromptTuningConfig

    prompt = make_adapter(
        tiny_path, tmp_path / "prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    with pytest.raises(FinetuneError, match="virtual tokens"):
        export_gguf(str(prompt), str(tmp_path / "p.gguf"))
    with pytest.raises(FinetuneError, match="GGUF export supports"):
        gpt2 = tmp_path / "gpt2"
        gpt2.mkdir()
        (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
        export_gguf(str(gpt2), str(tmp_path / "g.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "prompt"]
