"""What the server accepts and how it refuses: the request schemas (strict types: `true` is not 1), the
server's limits, the allow-list of chat_template_kwargs, and OpenAI-style JSON errors.

Every check a request body goes through before anything is rendered or generated lives here, so that a
malformed request is a 4xx with `{"error": {...}}` and never reaches the tokenizer, the template or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from finetune.errors import FinetuneError

API_KEY_ENV = "FINETUNE_API_KEY"

# chat_template_kwargs a request may set: switches that real chat templates read (Qwen3 / GLM's
# enable_thinking, DeepSeek-V3.1's thinking, gpt-oss's reasoning_effort). Anything else (above all
# `chat_template`, which would let a client run its own Jinja in the server) is refused; keys the
# recipe set in model.chat_template_kwargs are accepted too.
TEMPLATE_KWARGS = ("enable_thinking", "thinking", "reasoning_effort")
MAX_JSON_DEPTH = 32  # deeper request bodies are refused (json.loads itself recurses)
INT64 = (-(2**63), 2**63 - 1)


class ServeError(FinetuneError):
    """A serve option or dir that cannot be used."""


class APIError(Exception):
    """An OpenAI-style error response."""

    TYPES: ClassVar[dict[int, str]] = {500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """The bounds every request is held to (`finetune serve --max-...`)."""

    max_tokens: int = 1024  # a request's max_tokens: the cap, and the default when it names none
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    max_batch_size: int = 16  # rows in one generate call
    max_sequences: int = 64  # prompts x n of one request
    max_request_tokens: int = 131_072  # sum over its sequences of prompt tokens + max_tokens
    render_timeout_s: float = 10.0  # rendering + tokenizing one request's prompts
    max_images: int = 4  # image parts in one request (a vision-language model's)
    max_image_pixels: int = 1024 * 1024  # width x height of each (checked from the header, before decoding)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                flag = "--" + f.name.removesuffix("_s").replace("_", "-")
                raise ServeError(f"{flag}: must be a positive number, got {value!r}")


def check_json(data: Any) -> None:
    """Refuse what would reach the template or tokenizer and fail there: nesting deeper than
    MAX_JSON_DEPTH, strings that are not valid Unicode (a lone surrogate, which JSON's \\ud800 allows)."""
    stack = [(data, (), 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                param = ".".join(map(str, where)) or None
                raise APIError(
                    400, f"{param or 'body'}: a string holds a lone surrogate (not valid Unicode)", param=param
                ) from None
        elif isinstance(value, dict):
            stack += [(v, (*where, k), depth + 1) for k, v in value.items()]
            stack += [(k, (*where, k), depth + 1) for k in value]
        elif isinstance(value, list):
            stack += [(v, (*where, i), depth + 1) for i, v in enumerate(value)]


def parse_json(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    check_json(data)
    return data


def request_models():
    """The request bodies the server accepts (pydantic, built on first use: fastapi's dependency).
    Strict: no coercion of `true` to 1 or "1" to 1."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class Strict(BaseModel):
        model_config = ConfigDict(strict=True, extra="allow")

    class TextPart(Strict):
        type: Literal["text", "input_text", "output_text"]
        text: str

    class FunctionCall(Strict):
        name: str = Field(min_length=1)
        arguments: str | dict

        @field_validator("arguments")
        @classmethod
        def _json_object(cls, value):
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise ValueError(f"not valid JSON ({e})") from None
            if not isinstance(value, dict):
                raise ValueError("must be a JSON object")
            return json.dumps(value, ensure_ascii=False)

    class ToolCall(Strict):
        id: str | None = None
        type: Literal["function"] = "function"
        function: FunctionCall

    class ImageURL(Strict):
        url: str = Field(min_length=1)
        detail: Literal["auto", "low", "high"] | None = None

    class ImagePart(Strict):  # OpenAI's image content part; the url a data: URL (finetune fetches nothing)
        type: Literal["image_url"]
        image_url: ImageURL

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart | ImagePart] | None = None
        tool_calls: list[ToolCall] | None = None
        tool_call_id: str | None = None

    class FunctionSpec(Strict):
        name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
        description: str | None = None
        parameters: dict | None = None

    class Tool(Strict):
        type: Literal["function"]
        function: FunctionSpec

    class NamedFunction(Strict):
        name: str

    class NamedToolChoice(Strict):
        type: Literal["function"]
        function: NamedFunction

    class Common(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        n: int = Field(1, ge=1)
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
        stream: bool = False
        stream_options: dict | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        tools: list[Tool] | None = None
        tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
        chat_template_kwargs: dict[str, str | bool | int | float | None] | None = None

    class CompletionRequest(Common):
        prompt: str | list[str]

    return ChatRequest, CompletionRequest


def validation_error(e, data: dict) -> APIError:
    """pydantic's first complaint as a 400 naming the field (OpenAI answers bad values with 400)."""
    err = e.errors()[0]
    parts, node = [], data
    for i, key in enumerate(err["loc"]):  # the request's own keys, not pydantic's union branch tags
        if (isinstance(node, dict) and key in node) or (isinstance(node, list) and isinstance(key, int)):
            parts.append(str(key))
            node = node[key]
        elif i == len(err["loc"]) - 1 and isinstance(node, dict):  # a missing field
            parts.append(str(key))
    where = ".".join(parts) or "body"
    return APIError(400, f"{where}: {err['msg']}", param=where)


def request_images(messages: list[dict], limits: Limits) -> tuple[list[dict], list]:
    """(messages with plain `{"type": "image"}` parts, the opened images) of a chat request; a bad image or one
    over the limits is a 400 naming its part."""
    from finetune.image_inputs import ImageBounds, ImageInputError, with_images

    bounds = ImageBounds(
        max_images=limits.max_images, max_image_bytes=limits.max_body_bytes, max_image_pixels=limits.max_image_pixels
    )
    try:
        return with_images(messages, "request", bounds=bounds, files=False)
    except ImageInputError as e:
        message = str(e).removeprefix("request: ")
        param = message.split(":", 1)[0] if message.startswith("messages[") else "messages"
        raise APIError(400, message, param=param) from None


def template_kwargs(given: dict | None, recorded: dict) -> dict:
    """The recipe's chat_template_kwargs, updated by the request's: only allow-listed keys."""
    given = given or {}
    refused = sorted(k for k in given if k not in TEMPLATE_KWARGS and k not in recorded)
    if refused:
        allowed = ", ".join(sorted({*TEMPLATE_KWARGS, *recorded}))
        raise APIError(
            400,
            f"chat_template_kwargs: {refused[0]!r} is not accepted by this server (accepted: {allowed}); "
            "a request cannot bring its own chat template",
            param="chat_template_kwargs",
        )
    return {**recorded, **given}
