"""The `chatledger` command: main.py parses arguments, commands.py runs them, output.py and status.py
format what they print."""

from .main import main

__all__ = ["main"]
