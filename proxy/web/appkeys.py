"""The application's typed keys (web.AppKey), in their own module so every other module can import them
without cycles."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import Config
from ..relay.handler import Forwarder
from ..store.pricing.pricer import Pricer
from ..writer.protocol import Recorder
from .metrics import LedgerMetrics
from .startup import DatabaseStartup

CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", AsyncEngine)
RECORDER = web.AppKey("recorder", Recorder)
FORWARDER = web.AppKey("forwarder", Forwarder)
PRICER = web.AppKey("pricer", Pricer)
METRICS = web.AppKey("metrics", LedgerMetrics)
STARTUP = web.AppKey("startup", DatabaseStartup)
