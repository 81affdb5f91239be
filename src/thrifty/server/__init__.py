"""The HTTP face of the gateway: an ASGI app and the uvicorn runner."""

from thrifty.server.app import ThriftyApp, create_app

__all__ = ["ThriftyApp", "create_app"]
