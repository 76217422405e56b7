"""`openai` and `azure_openai` connections: one SDK client per run (or batch).

The SDK does what it is good at: auth, Azure URLs, request building, typed errors, retries, for
embeddings and non-streaming chat. The streaming chat request and the reading of its stream are the
chat step's fast path (flowrunner/llm/chat_request.py, flowrunner/llm/stream.py), on the same HTTP
client, with the URL and headers the SDK would send (`LLMClient.chat_url`, `headers`, `params`)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..errors import FlowDefinitionError
from .pool import ResolvedConnection

KEYLESS = "not-needed"
DEFAULT_IDLE_TIMEOUT = 120.0  # seconds with no byte from the server, before or inside a stream
DEFAULT_MAX_RETRIES = 2
DEFAULT_AZURE_API_VERSION = "2024-10-21"
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class LLMClient:
    name: str
    kind: str  # openai | azure_openai
    client: Any  # openai.AsyncOpenAI or openai.AsyncAzureOpenAI
    idle_timeout: float
    max_retries: int
    deployment: str | None = None  # Azure: the connection's default deployment
    where: str = ""  # base URL or endpoint, for error messages (never carries a secret)
    keyless: bool = False  # no API key was configured or set: a placeholder was sent
    http: Any = None  # the SDK client's httpx2.AsyncClient
    base: str = ""  # the SDK client's base URL, ending with "/"
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # what the SDK sends, auth included
    params: dict[str, str] = field(default_factory=dict)  # Azure: api-version
    urls: dict[str, Any] = field(default_factory=dict)  # chat URLs by model, parsed once
    requests: dict[int, Any] = field(default_factory=dict, repr=False)  # request templates (llm/request_head.py)

    def chat_url(self, model: str) -> Any:
        """The httpx2.URL a chat request for `model` goes to (Azure: the deployment's, api-version included)."""
        url = self.urls.get(model)
        if url is None:
            import httpx2

            from ..llm.stream import StreamError

            if self.kind == "azure_openai" and model in (".", ".."):
                raise StreamError(f"'{model}' is not a deployment name", "set the step's `deployment:`")
            path = f"deployments/{quote(model, safe='')}/chat/completions" if self.kind == "azure_openai" \
                else "chat/completions"
            if len(self.urls) >= 64:  # models that come from inputs: keep the cache small
                self.urls.clear()
            url = self.urls[model] = httpx2.URL(self.base + path, params=self.params)
        return url


def _headers(client: Any, auth: dict[str, str], idle: float) -> dict[str, str]:
    """The SDK's default headers (User-Agent, X-Stainless-*, OpenAI-Organization/-Project), with `auth`
    and the read timeout it announces."""
    return {**{k: v for k, v in client.default_headers.items() if isinstance(v, str)},
            "x-stainless-read-timeout": str(idle), **auth}


def _common(conn: ResolvedConnection) -> tuple[float, int, Any]:
    import httpx2

    idle = float(conn.config.get("timeout") or DEFAULT_IDLE_TIMEOUT)
    retries = int(conn.config.get("max_retries", DEFAULT_MAX_RETRIES))
    # The read timeout is the longest silence allowed: before the first byte and between chunks.
    return idle, retries, httpx2.Timeout(idle, connect=min(CONNECT_TIMEOUT, idle))


async def open_openai(conn: ResolvedConnection, stack: AsyncExitStack) -> LLMClient:
    import openai

    idle, retries, timeout = _common(conn)
    base_url = conn.config.get("base_url") or None
    api_key = conn.config.get("api_key")  # OPENAI_API_KEY when the flow names no key (registry.env_defaults)
    if not api_key:
        if base_url is None:
            conn.require("api_key", "an API key")  # raises, naming the env var that is not set
            raise FlowDefinitionError.at(f"connection '{conn.name}' needs an API key",
                                         hint="set OPENAI_API_KEY, or base_url for a local server")
        api_key = KEYLESS  # local OpenAI-compatible servers (Ollama, vLLM, llama.cpp) take any key
    http = _http_client(timeout)
    client = openai.AsyncOpenAI(
        api_key=api_key, base_url=base_url, organization=conn.config.get("organization"),
        project=conn.config.get("project"), timeout=timeout, max_retries=retries, http_client=http,
    )
    stack.push_async_callback(client.close)
    return LLMClient(conn.name, "openai", client, idle, retries, where=_without_userinfo(str(client.base_url)),
                     keyless=api_key == KEYLESS, http=http, base=str(client.base_url),
                     headers=_headers(client, {"Authorization": f"Bearer {api_key}"}, idle))


async def open_azure_openai(conn: ResolvedConnection, stack: AsyncExitStack) -> LLMClient:
    import openai

    idle, retries, timeout = _common(conn)
    endpoint = conn.require("endpoint")
    api_key, token = conn.config.get("api_key"), conn.config.get("azure_ad_token")
    if not api_key and not token:
        missing = conn.missing_env.get("api_key") or conn.missing_env.get("azure_ad_token")
        raise FlowDefinitionError.at(
            f"connection '{conn.name}' needs api_key or azure_ad_token"
            + (f": environment variable {missing} is not set" if missing else ""),
            path=f"connections.{conn.name}",
            hint="set api_key: ${env.AZURE_OPENAI_API_KEY}, or azure_ad_token for Entra ID",
        )
    api_version = conn.config.get("api_version") or DEFAULT_AZURE_API_VERSION
    http = _http_client(timeout)
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint, api_key=api_key or None, azure_ad_token=None if api_key else token,
        api_version=api_version, timeout=timeout, max_retries=retries, http_client=http,
    )
    stack.push_async_callback(client.close)
    auth = {"api-key": api_key} if api_key else {"Authorization": f"Bearer {token}"}
    return LLMClient(conn.name, "azure_openai", client, idle, retries, conn.config.get("deployment"),
                     _without_userinfo(endpoint), http=http, base=str(client.base_url), headers=_headers(client, auth, idle),
                     params={"api-version": api_version})


def _http_client(timeout: Any) -> Any:
    """The SDK's own HTTP client (its limits and redirects), with the batch rate limit's hook."""
    import openai

    from ..llm.limits import throttle

    return openai.DefaultAsyncHttpx2Client(timeout=timeout, event_hooks={"request": [throttle]})


def _without_userinfo(url: str) -> str:
    """A URL for messages: user:password@ removed."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url
