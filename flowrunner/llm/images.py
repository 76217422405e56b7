"""Images in the chat step's user message: `images:` URLs (https:, http:, data:) or image files.

A file is read from the flow file's folder (symlinks resolved; never outside it, as vector_upsert's
`files`), sniffed for its type (PNG, JPEG, GIF or WebP: what OpenAI's vision models take) and sent as
a base64 data URL; a file over MAX_IMAGE_BYTES is an error, not a request the server refuses later.
A file path that comes from a ${...} reference (a flow input: a `serve` client, a batch line) is
read only when the step sets `allow_referenced_files: true`: otherwise whoever gives the value
would choose which file of the server's disk is sent to the model. Those values may be URLs.

The user message then holds content parts, as the openai SDK sends them:
[{type: text, text}, {type: image_url, image_url: {url, detail?}}, ...]."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import Problem, StepFailed
from ..files import MIB, confined, format_size, is_regular

MAX_IMAGE_BYTES = 20 * MIB
URL_SCHEMES = ("https://", "http://", "data:")
DETAILS = ("auto", "low", "high")
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
               (b"GIF89a", "image/gif"))

_ITEM = {"anyOf": [{"type": "string", "minLength": 1},
                   {"type": "object", "required": ["url"], "additionalProperties": False,
                    "properties": {"url": {"type": "string", "minLength": 1},
                                   "detail": {"enum": list(DETAILS)}}}]}
PROPERTIES: dict[str, dict[str, Any]] = {
    "images": {"anyOf": [{"type": "array", "items": _ITEM}, {"$ref": "#/$defs/reference"}],
               "description": "images for the user message: https:/data: URLs or image files (relative to "
                              "the flow file's folder, at most 20 MiB each), each optionally {url, detail}"},
    "allow_referenced_files": {"type": "boolean", "default": False,
                               "description": "let `images` from a ${...} reference name files (still only "
                                              "inside the flow file's folder); otherwise those must be URLs"},
}


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_SCHEMES)


def check(spec: Any, flow: Any) -> list[Problem]:
    """Load time: a file written in the flow that lies outside the flow file's folder."""
    images, source = spec.props.get("images"), getattr(flow, "source", None)
    if not isinstance(images, list) or source is None or not source.file:
        return []
    base = Path(source.file).parent.resolve()
    problems = []
    for i, item in enumerate(images):
        where = item.get("url") if isinstance(item, Mapping) else item
        if not isinstance(where, str):
            continue
        path: tuple[Any, ...] = (*spec.path, "images", i) + (("url",) if isinstance(item, Mapping) else ())
        if where[:5].lower() == "data:" and not _data_url(where):
            problems.append(Problem("a data URL here must be data:image/<type>;base64,<data>", source.location(path),
                                    f"{spec.path_text}.images[{i}]",
                                    "e.g. data:image/png;base64,iVBORw0...; or name the image file"))
        elif not is_url(where) and confined(base, where) is None:
            problems.append(Problem(f"{where} lies outside the flow file's folder: a chat_completion step reads "
                                    "only images inside it", source.location(path),
                                    f"{spec.path_text}.images[{i}]",
                                    "move the image next to the flow (or below it), or give its https: URL"))
        elif not is_url(where) and not is_regular(base / where):
            problems.append(Problem(f"the image file {where} does not exist (looked for {base / where})",
                                    source.location(path), f"{spec.path_text}.images[{i}]",
                                    "the path is relative to the flow file's folder"))
    return problems


def referenced(spec_value: Any, count: int) -> list[bool]:
    """For each of `count` items: did its location come through a ${...} reference?"""
    from ..refs import Template

    if isinstance(spec_value, Template) or not isinstance(spec_value, list):
        return [True] * count
    out = []
    for item in spec_value:
        url = item.get("url") if isinstance(item, Mapping) else item
        out.append(isinstance(url, Template))
    return out + [True] * (count - len(out))


async def image_parts(images: Any, spec_value: Any, flow_file: str, allow_files: bool) -> list[dict[str, Any]]:
    """The image_url content parts of `images` (the resolved property), files read in a thread."""
    import asyncio

    if images is None:
        return []
    if not isinstance(images, list):
        raise StepFailed(f"images must be a list of URLs or files, got {type(images).__name__}")
    from_refs = referenced(spec_value, len(images))
    base = Path(flow_file).parent.resolve()
    parts = []
    for i, item in enumerate(images):
        url, detail = _item(item, i)
        if is_url(url):
            if url[:5].lower() == "data:" and not _data_url(url):
                raise StepFailed(f"images[{i}]: a data URL must be data:image/<type>;base64,<data>")
        elif from_refs[i] and not allow_files:
            raise StepFailed(f"images[{i}]: {_shown(url)} is not an https: or data: URL; a file named through a "
                             "${...} reference is not read", hint="pass the image's URL; or, if the value is "
                             "trusted, add `allow_referenced_files: true` to the step (files must still lie in "
                             "the flow file's folder)")
        else:
            url = await asyncio.to_thread(data_url, base, url, f"images[{i}]")
        parts.append(image_part(url if detail is None else {"url": url, "detail": detail}))
    return parts


def image_part(item: str | Mapping[str, Any]) -> dict[str, Any]:
    """The content part of one image: a URL, or {url, detail}."""
    image = {"url": item} if isinstance(item, str) else {"url": item["url"], "detail": item["detail"]}
    return {"type": "image_url", "image_url": image}


def with_images(message: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    """Turn the user `message` into content parts: its text, then the images."""
    text = message["content"]
    message["content"] = ([{"type": "text", "text": text}] if text else []) + parts


def shortened(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` as --dry-run shows them: a long data URL cut to its head and size (a photo would
    otherwise print megabytes of base64); the request itself is not changed."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(_long_data_url(p) for p in content):
            parts = [{**p, "image_url": {**p["image_url"], "url": _cut(p["image_url"]["url"])}}
                     if _long_data_url(p) else p for p in content]
            message = {**message, "content": parts}
        out.append(message)
    return out


def _long_data_url(part: Any) -> bool:
    url = part.get("image_url", {}).get("url") if isinstance(part, Mapping) and part.get("type") == "image_url" else None
    return isinstance(url, str) and url[:5].lower() == "data:" and len(url) > 120


def _cut(url: str) -> str:
    head, _, data = url.partition(",")
    return f"{head},{data[:40]}... ({format_size(len(data) * 3 // 4)})"


def _item(item: Any, i: int) -> tuple[str, str | None]:
    if isinstance(item, str) and item:
        return item, None
    if isinstance(item, Mapping) and isinstance(item.get("url"), str) and item["url"]:
        detail = item.get("detail")
        if detail is not None and detail not in DETAILS:
            raise StepFailed(f"images[{i}].detail must be one of {', '.join(DETAILS)}, got {_shown(detail)}")
        return item["url"], detail
    raise StepFailed(f"images[{i}] must be a URL or a file name (text), or {{url, detail}}, got {_shown(item)}")


def _data_url(url: str) -> bool:
    head, sep, _ = url.partition(",")
    return bool(sep) and head.lower().startswith("data:image/") and head.lower().endswith(";base64")


def data_url(base: Path, name: str, what: str) -> str:
    """The image file `name` (relative to `base`, inside it) as a base64 data URL. Messages name the
    file as written, never its absolute path (through `serve` they reach a client)."""
    import base64  # here: `validate` never reads an image

    path = confined(base, name)
    if path is None:
        raise StepFailed(f"{what}: {_shown(name)} lies outside the flow file's folder: a chat_completion step "
                         "reads only images inside it", hint="move the image there, or give its https: URL")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        raise StepFailed(f"{what}: no such image file: {_shown(name)}",
                         hint="a file is relative to the flow file's folder; a URL starts with https: or data:") from None
    except OSError as e:
        raise StepFailed(f"{what}: cannot read {_shown(name)}: {e.strerror or type(e).__name__}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise StepFailed(f"{what}: {_shown(name)} is larger than {format_size(MAX_IMAGE_BYTES)}, the most an image "
                         "may be", hint="scale the image down (OpenAI's models see at most 2048 px a side anyway)")
    mime = sniff(data)
    if mime is None:
        raise StepFailed(f"{what}: {_shown(name)} is not a PNG, JPEG, GIF or WebP image",
                         hint="those are the image types OpenAI's models take")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def sniff(data: bytes) -> str | None:
    """The MIME type of an image, from its first bytes (a file's name may lie)."""
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
