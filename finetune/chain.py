"""A stage that starts from a previous stage's output dir, and reward models read from `rm` dirs.

Chaining is merge-first: when `model.name_or_path` is a finetune/PEFT adapter dir (an `sft`
output, say), its adapter is merged into its base once, into a cached copy under
`$FINETUNE_CACHE/merged/`, and the next stage loads that copy as its base and trains a fresh
adapter on it. Why merge rather than train the SFT adapter further: DPO, KTO and PPO take their
reference model as "the policy with the adapter disabled" (no second copy in memory); if the
SFT adapter were the trained one, disabling it would give the raw base as the reference and the
KL term would pull the policy back from what SFT taught. With the SFT weights merged, the
reference is the SFT model, as in the papers. A copy on disk (rather than a merge in memory)
works for every model class (a reward model's sequence-classification head on an SFT model)
and lets QLoRA re-quantise the merged weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from finetune import security, tiny
from finetune.errors import RecipeError

log = logging.getLogger("finetune")

ADAPTER_CONFIG = "adapter_config.json"
MERGED_STAMP = "finetune_merged.json"  # written last: a merged copy without it is incomplete


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _adapter_config(adapter_dir: Path) -> dict:
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecipeError(f"{adapter_dir / ADAPTER_CONFIG}: unreadable adapter config: {e}") from None


def base_of(adapter_dir: str | os.PathLike, field: str = "model.name_or_path") -> str:
    """The path (or hub id) of the base an adapter dir was trained on, itself resolved (a tiny
    name is built, a chained base is merged). The adapter config's absolute path is used when it
    still exists; otherwise the `model.name_or_path` of the dir's recipe.yaml is resolved again
    (e.g. `tiny-llama` in another cache, or the `out/sft` dir the stage was chained from)."""
    adapter_dir = Path(adapter_dir)
    recorded = _adapter_config(adapter_dir).get("base_model_name_or_path") or ""
    if recorded and Path(recorded).is_dir():
        return recorded
    recipe_file = adapter_dir / "recipe.yaml"
    if recipe_file.is_file():
        import yaml

        name = ((yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}).get("model") or {}).get("name_or_path")
        if name:
            return resolve(tiny.resolve(name) if tiny.is_tiny(name) else name, field)
    if not recorded:
        raise RecipeError(f"{field}: {adapter_dir}: the adapter config names no base model")
    return recorded  # a hub id


def resolve(path: str, field: str = "model.name_or_path") -> str:
    """`path` itself, or for an adapter dir the cached merged copy of adapter + base."""
    if not is_adapter_dir(path):
        return path
    adapter_dir = Path(path).expanduser().resolve()
    task = _adapter_config(adapter_dir).get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise RecipeError(f"{field}: {path} holds a {task} adapter (a reward model?), not a language model to train on")
    return str(merged_copy(adapter_dir, field))


def _fingerprint(adapter_dir: Path, base: str) -> str:
    h = hashlib.sha256(base.encode())
    for name in sorted(p.name for p in adapter_dir.iterdir() if p.name.startswith("adapter_")):
        with open(adapter_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def merged_copy(adapter_dir: Path, field: str = "model.name_or_path") -> Path:
    """Merge the adapter into its base (full precision) once; the copy is cached by content."""
    base = base_of(adapter_dir, field)
    target = tiny.cache_root() / "merged" / f"{adapter_dir.name}-{_fingerprint(adapter_dir, base)}"
    if (target / MERGED_STAMP).is_file():
        return target
    from accelerate import PartialState

    with PartialState().main_process_first():  # one rank merges, the others find the copy
        if not (target / MERGED_STAMP).is_file():
            _merge_into(adapter_dir, base, target)
    return target


def _merge_into(adapter_dir: Path, base: str, target: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("chaining: merging the adapter in %s into %s (cached in %s)", adapter_dir, base, target)
    security.check_adapter_weights(adapter_dir, "model.allow_pickle=true")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    if not hasattr(model, "merge_and_unload"):  # prompt / prefix tuning: nothing to merge into the weights
        raise RecipeError(f"model.name_or_path: {adapter_dir} holds a {model.peft_config['default'].peft_type} adapter, "
                          "which cannot be merged into its base; a stage can only start from a mergeable (LoRA-type) adapter")
    model = model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(tmp)
        (tmp / MERGED_STAMP).write_text(json.dumps({"adapter": str(adapter_dir), "base": base}, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)  # an incomplete earlier attempt
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_reward_model(rm_dir: str | os.PathLike, dtype=None, merge: bool = True):
    """(model, tokenizer) of an `rm` output dir: the base as AutoModelForSequenceClassification
    (num_labels=1) with the reward adapter (LoRA + the trained score head) on it, merged into
    plain weights unless `merge=False`. Eval mode, no gradients. A QLoRA-trained reward model is
    loaded on the full-precision base (measured on the tiny model: eval margin 8.36 on the 4-bit
    base it trained on, 8.32 here; same pairwise accuracy)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = Path(rm_dir).expanduser().resolve()
    if not is_adapter_dir(rm_dir):
        raise RecipeError(f"{rm_dir}: not an `rm` output dir (no {ADAPTER_CONFIG})")
    task = _adapter_config(rm_dir).get("task_type")
    if task != "SEQ_CLS":
        raise RecipeError(f"{rm_dir}: holds a {task} adapter, not a reward model (train one with stage: rm)")
    tok = AutoTokenizer.from_pretrained(str(rm_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from trl.trainer.reward_trainer import suppress_seqcls_warning  # the head comes from the adapter

    base = base_of(rm_dir, field=str(rm_dir))
    security.check_adapter_weights(rm_dir, "model.allow_pickle=true")
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, dtype=dtype or torch.float32, use_safetensors=True, pad_token_id=tok.pad_token_id
        )
    model = PeftModel.from_pretrained(model, str(rm_dir))
    if merge:
        model = model.merge_and_unload()
    model.eval().requires_grad_(False)
    return model, tok
