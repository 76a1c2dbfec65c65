"""Typed application keys, in their own module so every other module can import them without cycles."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import Config
from .forward import Forwarder
from .metrics import LedgerMetrics
from .pricing import Pricer
from .recorder import Recorder
from .writer_process import RecorderLink

CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", AsyncEngine)
RECORDER = web.AppKey("recorder", Recorder | RecorderLink)
FORWARDER = web.AppKey("forwarder", Forwarder)
PRICER = web.AppKey("pricer", Pricer)
METRICS = web.AppKey("metrics", LedgerMetrics)
