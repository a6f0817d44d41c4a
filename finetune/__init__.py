"""finetune: parameter-efficient fine-tuning of open LLMs from YAML recipes."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend suggests an optional `kernels` package (a hub download) on import.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
