"""Images given to a trained vision-language model after training: `finetune chat --image`, image parts of a served
request, eval prompts with images and the merge check's probe.

One reader for all of them: a part `{"type": "image", "image": PATH | PIL image}`, `{"type": "image", "url": ...}`
or OpenAI's `{"type": "image_url", "image_url": {"url": ...}}`, where the reference is a file path or a `data:`
URL (base64). http(s) URLs are refused: finetune never fetches (it runs offline, and a server that fetched what a
request names would reach whatever the request names). Bounds (bytes, pixels, images per prompt) are checked
before the image is decoded in full, so a decompression bomb is one line, not an out-of-memory.

Rendering goes through the model's processor: the chat template writes its image placeholder for each image
part, then the processor expands it to the image's tokens and computes the pixel inputs. What generate()
needs beside input_ids (pixel_values, image_grid_thw, token_type_ids...) comes back in the same dict.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError

IMAGE_PART_TYPES = ("image", "image_url", "input_image")


class ImageInputError(FinetuneError):
    """An image reference that cannot be used (missing, unreadable, a URL, over a bound)."""


@dataclass(frozen=True)
class ImageBounds:
    """What one prompt may carry (`finetune serve --max-image-...`; chat and eval use the defaults)."""

    max_images: int = 8
    max_image_bytes: int = 16 << 20
    max_image_pixels: int = 4096 * 4096


DEFAULT_BOUNDS = ImageBounds()


def vision_processor(model_dir):
    """The processor of a vision-language model dir (an adapter: its own, else its base's); None for a text model."""
    from finetune import loading

    where = str(model_dir.path) if model_dir.kind == "model" else model_dir.base
    config = loading.load_config(where, field=model_dir.base_field or str(model_dir.path))
    return loading.load_processor(model_dir) if loading.is_vision_config(config) else None


def is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def has_images(messages) -> bool:
    """Whether any message of a chat has an image part."""
    if not isinstance(messages, list):
        return False
    return any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(is_image_part(p) for p in m["content"])
        for m in messages
    )


def part_reference(part: dict):
    """The path, URL or PIL image a part names (None if it names none)."""
    if part.get("type") == "image_url" or isinstance(part.get("image_url"), (dict, str)):
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None


def open_image(
    ref, where: str, base_dir: Path | None = None, bounds: ImageBounds = DEFAULT_BOUNDS, files: bool = True
):
    """An RGB PIL image from a path (relative to `base_dir`), a `data:` URL or a PIL image; errors name `where`.
    `files=False` (the server): data: URLs only, a request never names a file on the server."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return _checked(ref, where, bounds).convert("RGB")
    if not isinstance(ref, str) or not ref:
        raise ImageInputError(f"{where}: an image part names no image (give a file path or a data: URL)")
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ImageInputError(f"{where}: a data: URL must be base64 (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > bounds.max_image_bytes:
            raise ImageInputError(f"{where}: the image is over {bounds.max_image_bytes:,} bytes")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError(f"{where}: the data: URL is not valid base64") from None
        return _decode(raw, where, bounds)
    if not files:
        raise ImageInputError(
            f"{where}: only data: URLs are accepted (data:image/png;base64,...); the server reads no files "
            "and fetches no URLs"
        )
    if ref.startswith(("http://", "https://", "ftp://")):
        raise ImageInputError(
            f"{where}: image URLs are not fetched (finetune runs offline); send the image as a data: URL "
            "(data:image/png;base64,...) or a local file"
        )
    path = Path(ref.removeprefix("file://")).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise ImageInputError(f"{where}: {ref}: image file not found")
    size = path.stat().st_size
    if size == 0:
        raise ImageInputError(f"{where}: {path}: empty image file")
    if size > bounds.max_image_bytes:
        raise ImageInputError(f"{where}: {path}: the image is over {bounds.max_image_bytes:,} bytes")
    return _decode(path.read_bytes(), f"{where}: {path}", bounds)


def _decode(raw: bytes, where: str, bounds: ImageBounds):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(raw))
        _checked(image, where, bounds)  # from the header, before the pixels are decoded
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = type(e).__name__ if isinstance(e, UnidentifiedImageError) else (str(e).splitlines() or [""])[0]
        raise ImageInputError(f"{where}: not a readable image ({why or type(e).__name__})") from None
    return image.convert("RGB")


def _checked(image, where: str, bounds: ImageBounds):
    w, h = image.size
    if w == 0 or h == 0:
        raise ImageInputError(f"{where}: the image is empty ({w}x{h})")
    if w * h > bounds.max_image_pixels:
        raise ImageInputError(f"{where}: the image is {w}x{h}, over {bounds.max_image_pixels:,} pixels")
    return image


def with_images(
    messages: list[dict],
    where: str,
    base_dir: Path | None = None,
    bounds: ImageBounds = DEFAULT_BOUNDS,
    files: bool = True,
) -> tuple[list[dict], list]:
    """(messages whose image parts are plain `{"type": "image"}`, the opened images in order). Text parts in
    OpenAI's other spellings (`input_text`) become `text`. `files`: as open_image's."""
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            if is_image_part(part):
                if len(images) >= bounds.max_images:
                    raise ImageInputError(f"{where}: more than {bounds.max_images} images in one prompt")
                at = f"{where}: messages[{i}].content[{j}]"
                images.append(open_image(part_reference(part), at, base_dir, bounds, files))
                parts.append({"type": "image"})
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, images


def user_turn(text: str, images: list) -> dict:
    """A user message: the images first, then the text (as the processors' own examples put them)."""
    if not images:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}],
    }


def render(processor, messages: list[dict], template_kwargs: dict | None = None, images: list | None = None) -> dict:
    """Model inputs (input_ids, attention_mask, pixel_values, ...; batch of one) of a chat whose image parts
    are `{"type": "image"}` and whose images are `images`, rendered with a generation prompt."""
    text = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
    )
    return dict(processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False))


def to_model(enc: dict, model) -> dict:
    """`enc` on the model's device; floating inputs (pixel values) in the model's dtype."""
    param = next(model.parameters())
    return {k: v.to(param.device, param.dtype if v.is_floating_point() else None) for k, v in enc.items()}


def probe_image():
    """The merge check's image: a fixed picture (a red square on blue, a green stripe), the same on every machine."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (56, 56), (40, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 30, 30), fill=(220, 30, 30))
    draw.rectangle((0, 44, 55, 50), fill=(20, 180, 60))
    return image
