"""Generate the vision demo data: small PNGs of coloured shapes and questions whose answers name them.

    python data/tools/make_vision_demo.py          # writes data/vision/*.png and the two JSONL files

Deterministic (a fixed seed, PIL drawing only): the same files on every machine. English questions are
`messages` records with content parts ({"type": "image", "image": "shapes/x.png"}), Chinese ones sharegpt
records with an `images` column and an `<image>` placeholder: the two ways training data gives images.
Image paths are relative to the data file. `draw` is also what the tests use for held-out images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "vision"
SIZE = 56
COLOURS = {  # name: (RGB, Chinese)
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 170, 40), "绿色"),
    "blue": ((30, 60, 220), "蓝色"),
    "yellow": ((235, 200, 20), "黄色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
VARIANTS = 2  # images per colour and shape


def draw(colour: str, shape: str, rng: random.Random, size: int = SIZE):
    """One image: a white background with the shape in the colour, at a random place and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    side = rng.randint(size // 2, size - 8)
    x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
    fill = COLOURS[colour][0]
    if shape == "circle":
        pen.ellipse((x, y, x + side, y + side), fill=fill)
    elif shape == "square":
        pen.rectangle((x, y, x + side, y + side), fill=fill)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def main() -> None:
    rng = random.Random(0)
    (OUT / "shapes").mkdir(parents=True, exist_ok=True)
    en, zh = [], []
    for colour, (_, colour_zh) in COLOURS.items():
        for shape, shape_zh in SHAPES.items():
            for k in range(VARIANTS):
                name = f"shapes/{colour}_{shape}_{k}.png"
                draw(colour, shape, rng).save(OUT / name, optimize=True)
                image = {"type": "image", "image": name}
                en.append(
                    {
                        "messages": [
                            {
                                "role": "user",
                                "content": [image, {"type": "text", "text": "What colour is the shape?"}],
                            },
                            {"role": "assistant", "content": f"It is {colour}."},
                        ]
                    }
                )
                en.append(
                    {
                        "messages": [
                            {"role": "user", "content": [image, {"type": "text", "text": "What shape is this?"}]},
                            {"role": "assistant", "content": f"It is a {shape}."},
                        ]
                    }
                )
                for question, answer in (
                    ("这个图形是什么颜色？", f"{colour_zh}。"),
                    ("这是什么形状？", f"{shape_zh}。"),
                ):
                    zh.append(
                        {
                            "conversations": [
                                {"from": "human", "value": f"<image>{question}"},
                                {"from": "gpt", "value": answer},
                            ],
                            "images": [name],
                        }
                    )
    for path, rows in (("vision_en_demo.jsonl", en), ("vision_zh_demo.jsonl", zh)):
        with open(OUT / path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
