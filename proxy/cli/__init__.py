"""The `chatledger` command: main.py parses arguments, commands.py runs them, output.py and status.py
format what they print, escape.py makes logged values safe to print and to open as CSV."""

from .main import main

__all__ = ["main"]
