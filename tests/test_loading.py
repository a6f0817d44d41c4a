"""finetune.loading's one tokenizer policy, for a recipe's model section and for a dir alike: a chat
template always (finetune's plain one when the model has none), a pad token, the padding side training
needs for a recipe, the dir's own padding side kept for a dir (export writes the tokenizer back)."""

from __future__ import annotations

import json
import shutil

from finetune import loading
from finetune.config import ModelSection


def _model_without_template(tiny_path, tmp_path):
    """A copy of the tiny model whose tokenizer has no chat template and pads on the left."""
    d = tmp_path / "plain"
    shutil.copytree(tiny_path, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg["padding_side"] = "left"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_a_recipe_and_a_dir_get_the_same_template_policy_and_their_own_padding(tiny_path, tmp_path):
    d = _model_without_template(tiny_path, tmp_path)
    from_recipe = loading.load_tokenizer(ModelSection(name_or_path=str(d)))
    from_dir = loading.load_tokenizer(loading.inspect(d))
    for tok in (from_recipe, from_dir):
        assert tok.chat_template == loading.FALLBACK_CHAT_TEMPLATE and tok.pad_token is not None
    assert from_recipe.padding_side == "right"  # training pads on the right
    assert from_dir.padding_side == "left"  # the dir's own, as it was saved
    assert loading.load_tokenizer(loading.inspect(d), padding_side="right").padding_side == "right"
    assert loading.load_tokenizer(loading.inspect(tiny_path)).chat_template != loading.FALLBACK_CHAT_TEMPLATE
