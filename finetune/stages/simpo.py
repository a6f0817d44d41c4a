"""SimPO (Meng et al. 2024): `stage: cpo` with SimPO's defaults (loss_type simpo, cpo_alpha 0,
beta 2.0; see config.STAGE_TRAIN_DEFAULTS)."""

from finetune.stages.cpo import plan, run  # noqa: F401  (the stage interface: run, plan)
