"""Images in training data: references in records -> checked, opened PIL images.

A chat example with images keeps its messages' content as a list of parts, `{"type": "text", "text": ...}`
and `{"type": "image"}` (what chat templates render), and the images themselves, in the order their parts
appear, in `example["images"]`: each a reference string, resolved when the record is converted:
- a local path, relative to the data file's folder (absolute paths as they are);
- a `data:image/...;base64,...` URI (OpenAI's `image_url` parts), decoded in memory;
- an `http(s)://` URL, fetched when the image is opened (a machine that cannot reach it: one line).

Records give images three ways (`parts_of_content`, `split_placeholders`): a message content list with
`{"type": "image", "image": REF}` / `{"type": "image_url", "image_url": {"url": REF}}` parts, or LLaMA-Factory's
`images` column with one `<image>` placeholder in the text per image. Every problem is a `DataError` naming the
record and the field: a missing or empty file, an unreadable image, an `<image>` count that differs from the
images given. Opening happens once per image when the data is encoded (finetune.data.vision).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from finetune.errors import DataError

PLACEHOLDER = "<image>"  # LLaMA-Factory's placeholder in sharegpt / alpaca text
URL_TIMEOUT = 10.0  # seconds to fetch one http(s) image


def resolve(ref, root: str | None, where: str) -> str:
    """A record's image reference -> the string stored with the example (an absolute path, a data URI or a
    URL). A local file must exist and be non-empty (checked now: before any encoding)."""
    if isinstance(ref, dict):  # {"path": ...} / {"url": ...} (datasets' Image feature written as JSON)
        ref = ref.get("path") or ref.get("url")
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(f"{where}: expected an image path, URL or data: URI, got {type(ref).__name__}")
    ref = ref.strip()
    if ref.startswith("data:"):
        _data_uri_bytes(ref, where)  # malformed base64 fails here, not mid-training
        return ref
    if ref.startswith(("http://", "https://")):
        return ref
    if "://" in ref:
        raise DataError(f"{where}: {ref[:60]!r}: only local paths, http(s) URLs and data: URIs are supported")
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(root or ".") / path
    path = path.absolute()
    if not path.is_file():
        raise DataError(f"{where}: image {ref!r} not found (looked for {path})")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: image {ref!r} is an empty file (0 bytes)")
    return str(path)


def _data_uri_bytes(uri: str, where: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep or ";base64" not in head:
        raise DataError(f"{where}: a data: image must be base64 ('data:image/png;base64,...')")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: the data: image is not valid base64") from None
    if not raw:
        raise DataError(f"{where}: the data: image is empty")
    return raw


def _fetch(url: str, where: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as response:  # noqa: S310 (http(s) checked)
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"{where}: cannot fetch image {url[:80]!r} ({reason}); on an offline machine download the images "
            "and give local paths"
        ) from None


def open_image(ref: str, where: str):
    """The image as an RGB PIL image, fully decoded (a truncated or non-image file fails here)."""
    from PIL import Image, UnidentifiedImageError

    if ref.startswith("data:"):
        source = io.BytesIO(_data_uri_bytes(ref, where))
    elif ref.startswith(("http://", "https://")):
        source = io.BytesIO(_fetch(ref, where))
    else:
        source = ref
    try:
        with Image.open(source) as img:
            img.load()
            image = img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: image {ref!r} not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        shown = ref if not ref.startswith("data:") else "(data: URI)"
        raise DataError(f"{where}: image {shown} is not a readable image ({str(e).splitlines()[0][:120]})") from None
    if image.width == 0 or image.height == 0:
        raise DataError(f"{where}: image {ref!r} has zero size")
    return image


def fingerprint(refs) -> str:
    """The content identity of the images an encoded split depends on (for the prepared-data cache): local
    files by their bytes, data URIs by themselves, URLs by their text (their content is fetched later)."""
    from finetune.data import cache

    h = cache._xxh()
    for ref in refs:
        if ref.startswith(("data:", "http://", "https://")):
            h.update(ref.encode() + b"\0")
        else:
            try:
                h.update(ref.encode() + b"\0" + cache.file_fingerprint(Path(ref)).encode() + b"\0")
            except OSError:
                h.update(ref.encode() + b"\0missing\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- records -> parts


def parts_of_content(content, images: list, root, where: str):
    """A message's content as the canonical form: a string stays a string; a list of OpenAI / HF parts becomes
    text and `{"type": "image"}` parts, each image's reference resolved and appended to `images`."""
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: the content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        at = f"{where} part {j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise DataError(f"{at}: a text part needs a string 'text'")
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "image_url"):
            if kind == "image_url":
                url = part.get("image_url")
                ref = url.get("url") if isinstance(url, dict) else url
            else:
                ref = next((part[k] for k in ("image", "url", "path") if part.get(k)), None)
            images.append(resolve(ref, root, f"{at} ({kind})"))
            parts.append({"type": "image"})
        else:
            raise DataError(f"{at}: unknown part type {kind!r} (text, image, image_url)")
    return parts


def split_placeholders(text: str) -> list[dict] | str:
    """Text with `<image>` placeholders -> text and image parts (a string when it has none)."""
    if PLACEHOLDER not in text:
        return text
    parts: list[dict] = []
    for k, piece in enumerate(text.split(PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def with_placeholders(example: dict, refs, root, where: str, field: str) -> dict:
    """A chat example from a format with an `images` column (sharegpt, alpaca): each `<image>` in the
    messages' text becomes an image part; their count must equal the images given."""
    if refs is None or refs == []:
        refs = []
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list):
        raise DataError(f"{where}: field '{field}': expected a list of image paths")
    n = sum(m["content"].count(PLACEHOLDER) for m in example["messages"] if isinstance(m.get("content"), str))
    if n != len(refs):
        raise DataError(
            f"{where}: field '{field}': {len(refs)} image(s) given but the text has {n} {PLACEHOLDER} "
            f"placeholder(s); each image needs exactly one {PLACEHOLDER} where it belongs"
        )
    if not refs:
        return example
    for m in example["messages"]:
        if m["role"] != "user" and PLACEHOLDER in m["content"]:
            raise DataError(
                f"{where}: field '{field}': an {PLACEHOLDER} in a {m['role']} turn (images go in user turns)"
            )
    images = [resolve(r, root, f"{where}: field '{field}' item {k}") for k, r in enumerate(refs)]
    messages = [
        {**m, "content": split_placeholders(m["content"])} if m["role"] == "user" else m for m in example["messages"]
    ]
    return {**example, "messages": messages, "images": images}


def count_image_parts(messages: list[dict]) -> int:
    return sum(
        1 for m in messages if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") == "image"
    )


def text_of(content) -> str:
    """The text of a content (parts joined), for checks that read an answer."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""
