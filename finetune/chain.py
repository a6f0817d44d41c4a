"""A stage that starts from a previous stage's output dir (merge-first).

Chaining is merge-first: when `model.name_or_path` is a finetune/PEFT adapter dir (an `sft`
output, say), its adapter is merged into its base once, into a cached copy under
`$FINETUNE_CACHE/merged/`, and the next stage loads that copy as its base and trains a fresh
adapter on it. Why merge rather than train the SFT adapter further: DPO, KTO and PPO take their
reference model as "the policy with the adapter disabled" (no second copy in memory); if the
SFT adapter were the trained one, disabling it would give the raw base as the reference and the
KL term would pull the policy back from what SFT taught. With the SFT weights merged, the
reference is the SFT model, as in the papers. A copy on disk (rather than a merge in memory)
works for every model class (a reward model's sequence-classification head on an SFT model)
and lets QLoRA re-quantise the merged weights. (An `rm` dir is not a base to train on; it is
loaded as a scorer by `finetune.loading.load_reward_model`.) `finetune.loading.merged_copy` builds the
merged copy; `loading.model_path` and `loading.inspect` ask for it.

The chained output records which base it trained on, by content (`outputs.record_base`:
`base.json`), and every later reader finds that base through `outputs.OutputDir.base()`.
"""

from __future__ import annotations

import os

from finetune.outputs import OutputDir


def base_of(adapter_dir: str | os.PathLike, field: str = "model.name_or_path") -> str:
    """The path (or hub id) of the base an adapter dir was trained on (`OutputDir.base()`)."""
    return OutputDir(adapter_dir, field).base().where
