"""Build the tiny local model that the quickstart and every CPU test use.

``build_if_tiny("tiny-llama")`` returns the path of a plain Hugging Face model dir (Llama
architecture, byte-level BPE tokenizer, chat template with ``{% generation %}`` markers),
building it on first use and caching it under ``cache_root()/tiny/<name>-<fingerprint>``.
Nothing is downloaded: the tokenizer is trained on the corpus shipped in
``finetune/assets/corpus/`` and the model is briefly pre-trained on the same corpus.

Why pre-train at all: a randomly initialised tiny model has an ``lm_head`` so small that
LoRA on the attention/MLP layers (with ``lm_head`` frozen) cannot move the output
distribution; a briefly pre-trained one behaves like a (very small) real language model,
so "LoRA learns" tests mean something. Every character the demo data uses must occur in
the corpus, or its token's ``lm_head`` row stays untrained (see tests/test_tiny.py).

The built dir loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and no finetune
import. The build is deterministic on a given machine (fixed seeds, fixed data order,
fixed thread count), safe under concurrent callers (file lock + build into a temp dir,
renamed into place only when complete), and is redone whenever the corpus, the spec or
``BUILD_VERSION`` changes (they make up the dir's fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["TINY_MODELS", "TinySpec", "VisionSpec", "BUILD_VERSION", "is_tiny", "build_if_tiny", "build", "cache_root"]

# Bump when the build code changes in a way that changes the artefact.
BUILD_VERSION = 1

CORPUS_DIR = pathlib.Path(__file__).parent / "assets" / "corpus"
CORPUS_SUFFIXES = (".txt", ".tsv", ".docs")  # see Corpus below
INFO_FILE = "finetune_tiny.json"

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)  # ids 0..5 in this order

# Nothing follows {% endgeneration %} inside an assistant turn, so the generation-marker
# mask equals the span "prefix rendered with add_generation_prompt=True" -> "prefix + turn".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ m['content'] }}</s>{% endgeneration %}"
    "{% else %}{{ raise_exception('tiny chat template: unknown role ' + m['role']"
    " + ' (use system, user or assistant)') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a small, friendly assistant. Answer briefly.",
    "你是一个乐于助人的助手。",
    "你是一个小助手，请简短地回答。",
)


@dataclass(frozen=True)
class TinySpec:
    """Architecture and pre-training recipe of one tiny model (all of it is fingerprinted)."""

    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA, so merge/export code meets grouped K/V projections
    intermediate_size: int = 384  # a multiple of 64: bitsandbytes' CPU 4-bit inference path needs whole blocks
    vocab_size: int = 1536  # byte-level BPE target size, special tokens included
    max_positions: int = 1024
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3
    warmup_steps: int = 30
    chat_share: float = 0.25  # share of pre-training documents rendered through the chat template
    seed: int = 0


@dataclass(frozen=True)
class VisionSpec:
    """A tiny vision-language model (finetune.tiny_vision): a transformers VLM architecture at toy size,
    its language model taken from the tiny text model `text` where the parameter names fit."""

    style: str  # qwen2_5_vl | qwen2_vl | gemma3 | llava: how the processor puts images into the text
    text: str = "tiny-llama"
    seed: int = 0


TINY_MODELS: dict[str, TinySpec | VisionSpec] = {
    "tiny-llama": TinySpec(),
    "tiny-vlm": VisionSpec("qwen2_5_vl"),  # Qwen2.5-VL style: the quickstart's VLM
    "tiny-qwen2-vl": VisionSpec("qwen2_vl"),
    "tiny-gemma3-vlm": VisionSpec("gemma3"),
    "tiny-llava": VisionSpec("llava"),
}


# --------------------------------------------------------------------------- public API


def cache_root() -> pathlib.Path:
    """$FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE"):
        return pathlib.Path(os.environ["FINETUNE_CACHE"]).expanduser().absolute()
    if os.environ.get("XDG_CACHE_HOME"):
        return (pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "finetune").absolute()
    return (pathlib.Path.home() / ".cache" / "finetune").absolute()


def is_tiny(name_or_path: str | os.PathLike) -> bool:
    """True for a tiny-model name ("tiny-llama", or any "tiny-*" name that is not a path).

    An existing local path always wins (as in ``from_pretrained``), so a folder called
    ``tiny-llama`` in the working directory is loaded as a folder. Unknown "tiny-*" names
    count as tiny so that ``build_if_tiny`` can reject them with the list of valid names instead
    of a model-hub error.
    """
    s = os.fspath(name_or_path)
    if os.path.exists(s) or "/" in s or os.sep in s:
        return False
    return s in TINY_MODELS or s.startswith("tiny-")


def build_if_tiny(name_or_path: str | os.PathLike) -> str:
    """A tiny name -> absolute path of its built dir (built on first use); else unchanged."""
    if not is_tiny(name_or_path):
        return name_or_path  # type: ignore[return-value]
    return str(build(os.fspath(name_or_path)))


def build(name: str, cache_root: str | os.PathLike | None = None, force: bool = False) -> pathlib.Path:
    """Build (or find in the cache) the tiny model ``name``; return its dir.

    ``cache_root`` defaults to :func:`cache_root`; the dir is ``<root>/tiny/<name>-<fp12>``.
    ``force`` rebuilds even if the dir exists. A tiny VLM builds its text model first.
    """
    spec = _spec(name)
    root = pathlib.Path(cache_root).expanduser().absolute() if cache_root is not None else _default_root()
    text_dir = build(spec.text, root) if isinstance(spec, VisionSpec) else None
    fp = fingerprint(spec) if text_dir is None else _vision_fingerprint(spec, text_dir)
    parent = root / "tiny"
    target = parent / f"{name}-{fp[:12]}"
    if not force and _is_complete(target):
        return target
    from filelock import FileLock, Timeout

    parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(parent / f"{target.name}.lock"))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        print(f"finetune: waiting for another process to finish building {name} into {target}", file=sys.stderr)
        lock.acquire()
    try:
        if _is_complete(target) and not force:
            return target  # another process built it while we waited
        for stale in parent.glob(f".{target.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        print(
            f"finetune: building {name} into {target} (one-off; the progress lines give the time left, "
            "from the measured speed)",
            file=sys.stderr,
            flush=True,
        )
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            info = (
                _build_into(tmp, name, spec, fp) if text_dir is None else _build_vision(tmp, name, spec, fp, text_dir)
            )
            from finetune.atomic import replace_dir

            replace_dir(
                tmp, target
            )  # modes follow the umask (the cache may be shared); force=True swaps the old one out
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        trained = (
            f" (pre-training loss {info['init_loss']:.2f} -> {info['final_loss']:.2f})" if "init_loss" in info else ""
        )
        print(
            f"finetune: built {name} in {info['build_seconds']:.1f} s{trained}",
            file=sys.stderr,
            flush=True,
        )
        return target
    finally:
        lock.release()


def fingerprint(spec: TinySpec) -> str:
    """sha256 over BUILD_VERSION, the spec and the corpus bytes (hex)."""
    h = hashlib.sha256()
    h.update(f"finetune-tiny/{BUILD_VERSION}\n".encode())
    h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for path in _corpus_files():
        h.update(f"\n{path.name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _vision_fingerprint(spec: VisionSpec, text_dir: pathlib.Path) -> str:
    """sha256 over BUILD_VERSION, the spec and its text model's dir name (which holds that one's fingerprint)."""
    h = hashlib.sha256()
    h.update(f"finetune-tiny-vision/{BUILD_VERSION}\n".encode())
    h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    h.update(text_dir.name.encode())
    return h.hexdigest()


def _build_vision(out: pathlib.Path, name: str, spec: VisionSpec, fp: str, text_dir: pathlib.Path) -> dict:
    import torch

    from finetune import tiny_vision

    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            info = tiny_vision.build_into(out, spec.style, text_dir, spec.seed)
    finally:
        torch.set_num_threads(prev_threads)
    info.update(
        name=name,
        fingerprint=fp,
        build_version=BUILD_VERSION,
        spec=dataclasses.asdict(spec),
        build_seconds=round(time.perf_counter() - t0, 2),
        versions=_versions(),
    )
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


# --------------------------------------------------------------------------- internals


def _default_root() -> pathlib.Path:
    return cache_root()


def _spec(name: str) -> TinySpec:
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; valid names: {', '.join(sorted(TINY_MODELS))}")
    return TINY_MODELS[name]


def _is_complete(path: pathlib.Path) -> bool:
    return (path / INFO_FILE).is_file()


def _corpus_files() -> list[pathlib.Path]:
    files = sorted(p for p in CORPUS_DIR.iterdir() if p.suffix in CORPUS_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no corpus files ({', '.join('*' + x for x in CORPUS_SUFFIXES)}) in {CORPUS_DIR}")
    return files


class Corpus(NamedTuple):
    sentences: list[str]  # *.txt: one sentence or short paragraph per line
    pairs: list[tuple[str, str]]  # *.tsv: question<TAB>answer per line
    documents: list[str]  # *.docs: multi-line documents separated by a line "---"


def load_corpus() -> Corpus:
    """The shipped corpus, in file order."""
    corpus = Corpus([], [], [])
    for path in _corpus_files():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".docs":
            docs = [d.strip("\n") for d in text.split("\n---\n")]
            corpus.documents.extend(d for d in docs if d.strip())
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".tsv":
                q, sep, a = line.partition("\t")
                if not sep or not q.strip() or not a.strip():
                    raise ValueError(f"{path}:{lineno}: expected 'question<TAB>answer'")
                corpus.pairs.append((q.strip(), a.strip()))
            else:
                corpus.sentences.append(line)
    return corpus


def corpus_texts() -> list[str]:
    """Every text of the corpus (sentences, questions, answers, documents): what the
    tokenizer is trained on, and what "the corpus covers the demo data" is checked against."""
    c = load_corpus()
    return c.sentences + [t for qa in c.pairs for t in qa] + c.documents


def _train_tokenizer(spec: TinySpec, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any UTF-8 text encodes
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama convention: plain encode() prepends <s>; the chat template writes its own <s>
    # and apply_chat_template tokenizes with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=spec.max_positions,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _documents(tokenizer, spec: TinySpec, rng: random.Random, n_tokens: int) -> list[int]:
    """A token stream of at least n_tokens: shuffled corpus documents, each `<s> text </s>`,
    with a `chat_share` of chats rendered through the chat template (which ends with </s>)."""
    sentences, pairs, documents = load_corpus()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    order: list[int] = []
    stream: list[int] = []

    def text_doc() -> str:
        nonlocal order
        if not order:
            order = list(range(len(sentences)))
            rng.shuffle(order)
        first = sentences[order.pop()]
        parts = [first]
        for _ in range(rng.choice((0, 0, 1, 2))):  # 1-3 sentences of the same language
            other = sentences[rng.randrange(len(sentences))]
            if other.isascii() == first.isascii():
                parts.append(other)
        r = rng.random()
        if r < 0.2 and pairs:  # Q/A pairs also appear as plain text
            q, a = pairs[rng.randrange(len(pairs))]
            return q + rng.choice(("\n", " " if q.isascii() else "")) + a
        if r < 0.3 and documents:  # multi-line documents: lists, letters, code, "\n\n"
            return documents[rng.randrange(len(documents))]
        return (" " if first.isascii() else "").join(parts)

    def chat_doc() -> list[dict]:
        msgs: list[dict] = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.choice((1, 1, 2))):
            if rng.random() < 0.6 and pairs:
                q, a = pairs[rng.randrange(len(pairs))]
            else:  # a sentence split in two: the assistant continues the user's half
                s = sentences[rng.randrange(len(sentences))]
                if s.isascii():
                    words = s.split(" ")
                    if len(words) < 2:
                        continue
                    k = rng.randint(1, len(words) - 1)
                    q, a = " ".join(words[:k]), " ".join(words[k:])
                else:
                    if len(s) < 2:
                        continue
                    k = rng.randint(1, len(s) - 1)
                    q, a = s[:k], s[k:]
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if not any(m["role"] == "assistant" for m in msgs):
            q, a = pairs[0] if pairs else ("Hello!", "Hello!")
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs

    while len(stream) < n_tokens:
        pending = [
            ("chat", chat_doc()) if rng.random() < spec.chat_share else ("text", text_doc()) for _ in range(512)
        ]
        texts = [tokenizer.apply_chat_template(d, tokenize=False) if kind == "chat" else d for kind, d in pending]
        for kind, ids in zip((k for k, _ in pending), tokenizer(texts, add_special_tokens=False)["input_ids"]):
            stream.extend(ids if kind == "chat" else [bos, *ids, eos])
    return stream


def _rows(stream: list[int], seq_len: int):
    import torch

    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


BUILD_THREADS = 1


class _Progress:
    """The pre-training's progress on stderr: a bar on a terminal, else a line every 10% (no \\r in logs)."""

    def __init__(self, name: str, steps: int):
        self.steps, self.bar, self.last = steps, None, 0
        self.t0 = time.perf_counter()
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=f"pre-training {name}", unit="step", leave=False, file=sys.stderr)
        self.name = name

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
        elif step * 10 // self.steps > self.last * 10 // self.steps:
            rate = step / max(time.perf_counter() - self.t0, 1e-9)
            left = (self.steps - step) / max(rate, 1e-9)
            print(
                f"finetune: pre-training {self.name}: step {step}/{self.steps}, loss {loss:.3g}, {rate:.1f} steps/s, "
                f"~{left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )
            self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _build_into(out: pathlib.Path, name: str, spec: TinySpec, fp: str) -> dict:
    """Train tokenizer + pre-train model; write a complete HF model dir into ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if spec.arch != "llama":
        raise ValueError(f"tiny spec {name}: unsupported arch {spec.arch!r} (only 'llama')")
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    # A fixed thread count keeps the float reductions, hence the weights, reproducible. One thread: the
    # model is too small to gain from more, and several OpenMP threads on a loaded machine spin and
    # wait for each other (a build took 600 s instead of 38 s beside other torch processes).
    torch.set_num_threads(BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(spec.seed)
            rng = random.Random(spec.seed)
            tokenizer = _train_tokenizer(spec, corpus_texts())
            cfg = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=spec.hidden_size,
                intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers,
                num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads,
                max_position_embeddings=spec.max_positions,
                tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                dtype="float32",
            )
            model = LlamaForCausalLM(cfg).float()

            steps, bs, seq = spec.pretrain_steps, spec.pretrain_batch, spec.pretrain_seq_len
            train = _rows(_documents(tokenizer, spec, rng, steps * bs * seq + seq), seq)
            evals = _rows(_documents(tokenizer, spec, random.Random(spec.seed + 1), 8 * seq), seq)[:8]
            init_loss = _eval_loss(model, evals)

            opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01)
            warm = max(1, spec.warmup_steps)

            def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
                if step < warm:
                    return (step + 1) / warm
                p = (step - warm) / max(1, steps - warm)
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.seed))
            losses: list[float] = []
            model.train()
            progress = _Progress(name, steps)
            for step in range(steps):
                idx = perm[(torch.arange(bs) + step * bs) % len(train)]
                batch = train[idx]
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                progress.update(step + 1, losses[-1])
            progress.close()
            model.eval()
            final_loss = _eval_loss(model, evals)

            model.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            tail = losses[-20:] if losses else [float("nan")]
            info = {
                "name": name,
                "fingerprint": fp,
                "build_version": BUILD_VERSION,
                "spec": dataclasses.asdict(spec),
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "corpus_files": [p.name for p in _corpus_files()],
                "pretrain_tokens": steps * bs * seq,
                "init_loss": round(init_loss, 4),
                "final_loss": round(final_loss, 4),
                "final_train_loss": round(sum(tail) / len(tail), 4),
                "first_train_losses": [round(x, 4) for x in losses[:5]],
                "build_seconds": round(time.perf_counter() - t0, 2),
                "threads": torch.get_num_threads(),
                "versions": _versions(),
            }
            # Written last: its presence marks the dir complete (on top of the atomic rename).
            (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            return info
    finally:
        torch.set_num_threads(prev_threads)


def _eval_loss(model, rows) -> float:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=rows, labels=rows).loss.item()
    model.train(was_training)
    return loss


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
