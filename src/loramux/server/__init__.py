"""OpenAI-compatible HTTP server over the engine (`loramux serve`)."""

from .app import ServerConfig, create_app

__all__ = ["create_app", "ServerConfig"]
