"""The HTTP server: OpenAI, Cohere and vLLM-style routes on Litestar (no torch)."""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from toolkit.server.app import create_app

        return create_app
    raise AttributeError(name)
