"""What the web UI runs in a child process, never in its own: `python -m finetune.webui.child DATA
MODEL INDEX` prints `finetune data preview`'s coloured text (the UI turns it into HTML). Loading a tokenizer
can run a model's code; a crash or a hang here never takes the UI down."""

import sys

from finetune.errors import FinetuneError


def main(argv: list[str]) -> int:
    from finetune import loading
    from finetune.config import ModelSection
    from finetune.data.preview import preview

    dataset, model, index = argv
    try:
        tok = loading.load_tokenizer(ModelSection(name_or_path=model))
        print(preview(dataset, tok, index=int(index), color=True))
    except (FinetuneError, OSError, ValueError) as e:
        print(f"finetune: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
