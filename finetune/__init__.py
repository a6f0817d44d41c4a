"""finetune: parameter-efficient fine-tuning of open LLMs from YAML recipes."""

__version__ = "0.1.0"
