"""flowrunner: run declarative YAML flows for LLM chat backends."""

__version__ = "0.1.0"
