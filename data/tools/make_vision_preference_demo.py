"""Write data/vision/vision_preference_demo.jsonl: image preference pairs on the shipped shape images.

Each pair asks the colour (or the shape) of one image of data/vision/shapes (drawn by make_vision_demo.py):
chosen names it, rejected names another colour (shape). Half the records give the image as a content part,
half as an `images` column with an `<image>` placeholder (LLaMA-Factory's form), so both readers are used.
Deterministic: run it again and the file is the same.

    python data/tools/make_vision_preference_demo.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "vision"
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def main() -> None:
    rng = random.Random(0)
    rows = []
    for k, path in enumerate(sorted((HERE / "shapes").glob("*.png"))):
        colour, shape, _ = path.stem.split("_")
        ref = f"shapes/{path.name}"
        for ask in ("colour", "shape"):
            if ask == "colour":
                question, right = "What colour is the shape?", colour
                wrong = rng.choice([c for c in COLOURS if c != colour])
            else:
                question, right = "What shape is this?", shape
                wrong = rng.choice([s for s in SHAPES if s != shape])
            chosen, rejected = (
                f"It is {'a ' if ask == 'shape' else ''}{right}.",
                f"It is {'a ' if ask == 'shape' else ''}{wrong}.",
            )
            if (k + (ask == "shape")) % 2 == 0:
                prompt = [
                    {"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": question}]}
                ]
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            else:
                rows.append({"prompt": f"<image>{question}", "images": [ref], "chosen": chosen, "rejected": rejected})
    out = HERE / "vision_preference_demo.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {out}")


if __name__ == "__main__":
    main()
