"""Real tokenizers through GGUF export: a model carrying the real Qwen2 or Llama-3 tokenizer (llama.cpp's
vocab files, tests/fixtures/vocab) is exported, and the written file tokenizes every llama.cpp test string
to the ids the original Hugging Face tokenizer gives (the `.out` vectors). The file is tokenized as
llama.cpp does it: the split regex llama-vocab.cpp runs for the file's `tokenizer.ggml.pre`, then
byte-level BPE with the file's own tokens and merges."""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import torch
from _support import real_vocab
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from finetune import gguf_export

VOCAB = Path(__file__).parent / "fixtures" / "vocab"
# llama.cpp's src/llama-vocab.cpp, the regexes it runs per tokenizer.ggml.pre (copied, not shared with the exporter)
LLAMA_CPP_REGEX = {
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    "llama-bpe": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
IGNORE_MERGES = {"llama-bpe"}  # llama.cpp: a whole pre-token that is in the vocab is one token


def vectors(name):
    inp = (VOCAB / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = (VOCAB / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inp, out)]


def _byte_chars():
    """GPT-2's byte -> printable character map (byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class GGUFBPE:
    """Tokenizes as llama.cpp would, from a GGUF's metadata alone."""

    def __init__(self, meta):
        self.pre = meta["tokenizer.ggml.pre"]
        self.split = regex.compile(LLAMA_CPP_REGEX[self.pre])
        self.ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        self.chars = _byte_chars()
        self.word = lru_cache(maxsize=None)(self._word)

    def _word(self, word):
        if self.pre in IGNORE_MERGES and word in self.ids:
            return [self.ids[word]]
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, 1 << 60), i) for i, pair in enumerate(itertools.pairwise(parts))]
            rank, i = min(ranked)
            if rank == 1 << 60:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self.ids[p] for p in parts]

    def encode(self, text):
        out = []
        for piece in self.split.findall(text):
            out += self.word("".join(self.chars[b] for b in piece.encode("utf-8")))
        return out


def model_with_real_tokenizer(root: Path, name: str, tokenizer_class: str, claim_gpt2: bool) -> Path:
    """A tiny Llama whose tokenizer is the real one from the vocab file. With `claim_gpt2`, tokenizer.json
    says plain byte-level (GPT-2) pre-tokenization, as some released Qwen2 dirs do, while the tokenizer
    class transformers loads splits text its own way: the exporter must follow what the tokenizer does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    meta, _ = gguf_export.read_gguf(real_vocab(name))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    bpe = models.BPE(
        {t: i for i, t in enumerate(tokens)},
        [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]],
        ignore_merges=name in IGNORE_MERGES,
    )
    tk = Tokenizer(bpe)
    split = [] if claim_gpt2 else [pre_tokenizers.Split(Regex(LLAMA_CPP_REGEX[name]), behavior="isolated")]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=claim_gpt2)]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == 3]
    )
    bos, eos = tokens[meta["tokenizer.ggml.bos_token_id"]], tokens[meta["tokenizer.ggml.eos_token_id"]]
    out = root / name
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos).save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "tokenizer_class": tokenizer_class}))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


@pytest.mark.parametrize(
    "name,tokenizer_class,claim_gpt2",
    [
        ("qwen2", "Qwen2Tokenizer", True),  # divergence (a): tokenizer.json says gpt-2, the tokenizer splits digits
        ("llama-bpe", "PreTrainedTokenizerFast", False),
    ],
)
def test_a_gguf_with_a_real_tokenizer_tokenizes_like_hf(tmp_path, name, tokenizer_class, claim_gpt2):
    model_dir = model_with_real_tokenizer(tmp_path, name, tokenizer_class, claim_gpt2)
    cases = vectors(name)
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    hf_ok = [hf.encode(text, add_special_tokens=False) == ids for text, ids in cases]
    assert sum(hf_ok) >= len(cases) - 1  # the model's tokenizer is the real one (one known HF/llama.cpp case aside)

    report = gguf_export.convert(model_dir, tmp_path / "m.gguf", "f16")
    assert report.pre == name
    meta, _ = gguf_export.read_gguf(tmp_path / "m.gguf")
    bpe = GGUFBPE(meta)
    got = [bpe.encode(text) for text, _ in cases]
    assert [g == hf.encode(text, add_special_tokens=False) for g, (text, _) in zip(got, cases)] == [True] * len(cases)
    assert [g == ids for g, (_, ids) in zip(got, cases)] == hf_ok
    if claim_gpt2:  # what tokenizer.json claims (gpt-2) would have tokenized some test strings differently
        gpt2 = GGUFBPE({**meta, "tokenizer.ggml.pre": "gpt-2"})
        assert sum(gpt2.encode(text) != ids for text, ids in cases) >= 3


def test_a_qwen3_5_style_tokenizer_gets_the_qwen35_pre_tokenizer(tmp_path):
    """Qwen3.5's split keeps combining marks in words (llama.cpp's `qwen35`): the real Qwen2 vocab behind that
    split is written as qwen35, and the file tokenizes llama.cpp's test strings and Thai, Arabic with harakat and
    Devanagari as the tokenizer does (under qwen2 the marks would split off)."""
    model_dir = model_with_real_tokenizer(tmp_path, "qwen2", "PreTrainedTokenizerFast", False)
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = LLAMA_CPP_REGEX["qwen35"]
    (model_dir / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    report = gguf_export.convert(model_dir, tmp_path / "m.gguf", "f16")
    assert report.pre == "qwen35"
    meta, _ = gguf_export.read_gguf(tmp_path / "m.gguf")
    texts = [text for text, _ in vectors("qwen2")] + ["สวัสดีครับ", "مَرْحَبًا بِكُمْ", "नमस्ते दुनिया"]
    bpe, qwen2 = GGUFBPE(meta), GGUFBPE({**meta, "tokenizer.ggml.pre": "qwen2"})
    assert all(bpe.encode(text) == hf.encode(text, add_special_tokens=False) for text in texts)
    assert sum(qwen2.encode(text) != hf.encode(text, add_special_tokens=False) for text in texts[-3:]) >= 2


class GGUFSPM:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), from a GGUF's metadata alone: spaces become
    U+2581 (one prepended when add_space_prefix), then the adjacent pair whose concatenation is a token with
    the highest score merges first (leftmost on ties); characters with no token fall back to <0xXX> bytes."""

    def __init__(self, meta):
        self.ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
        self.scores = meta["tokenizer.ggml.scores"]
        self.prefix = meta.get("tokenizer.ggml.add_space_prefix", True)

    def encode(self, text):
        import heapq

        if not text:
            return []
        text = ("\u2581" if self.prefix else "") + text.replace(" ", "\u2581")
        symbols = list(text)
        alive = [True] * len(symbols)
        nxt, prv = list(range(1, len(symbols) + 1)), list(range(-1, len(symbols) - 1))
        heap = []

        def push(left):
            right = nxt[left]
            if right < len(symbols):
                merged = symbols[left] + symbols[right]
                if merged in self.ids:
                    heapq.heappush(heap, (-self.scores[self.ids[merged]], left, merged))

        for i in range(len(symbols) - 1):
            push(i)
        while heap:
            _, left, merged = heapq.heappop(heap)
            right = nxt[left] if alive[left] else len(symbols)
            if right >= len(symbols) or symbols[left] + symbols[right] != merged:
                continue  # stale
            symbols[left], alive[right] = merged, False
            nxt[left] = nxt[right]
            if nxt[right] < len(symbols):
                prv[nxt[right]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)
        out = []
        for i, sym in enumerate(symbols):
            if alive[i]:
                out += [self.ids[sym]] if sym in self.ids else [self.ids[f"<0x{b:02X}>"] for b in sym.encode("utf-8")]
        return out


def test_a_gguf_with_a_real_sentencepiece_tokenizer_tokenizes_like_hf(tmp_path):
    """Phi-3's tokenizer (SentencePiece-style BPE with byte fallback; Gemma's and Llama-2's are of this kind):
    written as a `llama` vocab whose scores rank the merges, it tokenizes llama.cpp's test strings as HF does."""
    import shutil

    model_dir = tmp_path / "phi3"
    shutil.copytree(VOCAB / "phi-3-hf", model_dir)
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    cases = vectors("phi-3")
    assert [hf.encode(text, add_special_tokens=False) == ids for text, ids in cases] == [True] * len(cases)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(model_dir))

    gguf_export.convert(model_dir, tmp_path / "m.gguf", "f16")
    meta, _ = gguf_export.read_gguf(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    spm = GGUFSPM(meta)
    assert [spm.encode(text) == ids for text, ids in cases] == [True] * len(cases)
