"""chatledger: a response-logging reverse proxy for OpenAI-compatible chat APIs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chatledger")
except PackageNotFoundError:  # running from a source checkout
    __version__ = "0.0.0+source"
