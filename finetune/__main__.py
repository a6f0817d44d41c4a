"""`python -m finetune` is the `finetune` command (so `accelerate launch -m finetune ...` works)."""

from finetune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
