"""Pytest fixtures for the OpenAI test server: `from tests.support.fixtures import *` in a conftest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .openai_script import RECORDINGS, Reply
from .openai_server import OpenAIServer

__all__ = ["openai_server", "llm", "OpenAIServer", "Reply", "RECORDINGS"]


@pytest.fixture(scope="session")
def openai_server() -> Iterator[OpenAIServer]:
    """One server for the whole run: starting it is cheap, but keep-alive connections outlive tests."""
    with OpenAIServer() as server:
        yield server


@pytest.fixture
def llm(openai_server: OpenAIServer) -> OpenAIServer:
    """The session server with a clean script, request log and counters for this test."""
    openai_server.reset()
    return openai_server
