"""`finetune env`: what a bug report needs (versions, device, CPU features, caches), and the
library versions `finetune --version` prints. Package metadata only, except the device lines."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

from finetune import __version__

LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "evaluate",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "gguf",
)
OPTIONAL = (
    "deepspeed",
    "ninja",
    "flash_attn",
    "lm_eval",
    "wandb",
    "mlflow",
    "trackio",
    "tensorboard",
    "rouge_chinese",
    "jieba",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "neon", "asimd", "sve")


def version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def version_line() -> str:
    """`finetune X (torch Y, transformers Z, ...)`: the one line `--version` prints."""
    libs = ", ".join(f"{name} {version_of(name)}" for name in LIBRARIES[:6] if version_of(name))
    return f"finetune {__version__} ({libs}; Python {platform.python_version()})"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in flags]


def _device_lines() -> list[tuple[str, str]]:
    import torch

    rows = [("torch threads", str(torch.get_num_threads())), ("CPU cores", str(os.cpu_count()))]
    rows.append(("CPU features", ", ".join(_cpu_flags()) or "none of " + ", ".join(CPU_FLAGS)))
    if torch.cuda.is_available():
        rows.append(("CUDA", f"{torch.version.cuda} (cuDNN {torch.backends.cudnn.version()})"))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
            rows.append(
                (f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, bf16 {bf16}")
            )
    else:
        rows.append(
            (
                "CUDA",
                f"not available (torch built with CUDA {torch.version.cuda})"
                if torch.version.cuda
                else "not available (CPU-only torch)",
            )
        )
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        rows.append(("MPS", "available"))
    return rows


def _built_ops() -> str:
    """DeepSpeed JIT-builds its ops on first use (on CPU: deepspeed_shm_comm, with g++ and ninja), into torch's
    extensions dir: which are built already (a first sharded run on a fresh machine waits for the build)."""
    from pathlib import Path

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    built = sorted(so.parent.name for so in root.glob("*/*/*.so")) if root.is_dir() else []
    return f"{', '.join(built) or 'none built yet'} ({root})"


def report() -> str:
    """Every line of `finetune env`, aligned (paste it into a bug report)."""
    from huggingface_hub import constants

    from finetune import tiny

    rows = [
        ("finetune", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
    ]
    rows += [(name, version_of(name) or "not installed") for name in LIBRARIES]
    rows += [(name, version_of(name)) for name in OPTIONAL if version_of(name)]
    rows += _device_lines()
    if version_of("deepspeed"):
        rows.append(("DeepSpeed ops", _built_ops()))
    rows += [
        ("finetune cache", str(tiny.cache_root())),
        ("HF hub cache", constants.HF_HUB_CACHE),
        ("HF offline", str(constants.HF_HUB_OFFLINE)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
