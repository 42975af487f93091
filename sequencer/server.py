"""The dashboard's server: Streamlit's ASGI app with the scheduler and tracking.

``st.App`` serves the dashboard on Starlette and uvicorn. Its lifespan starts
this process's one scheduler and the tracking event writer when the server
starts (before any browser connects) and stops both when it exits, so sending
does not depend on an open tab, and five tabs still make one scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from sequencer import tracking
from sequencer.config import ROOT, get_settings
from sequencer.scheduler import start_scheduler, stop_scheduler
from sequencer.worker import configure_logging

logger = logging.getLogger(__name__)

SCRIPT = ROOT / "app.py"


@asynccontextmanager
async def lifespan(_app: Any) -> AsyncIterator[None]:
    """Start the scheduler and event writer with the server; stop them with it."""
    await asyncio.to_thread(start_scheduler)
    tracking.start_writer()
    logger.info("dashboard server started with its scheduler")
    try:
        yield
    finally:
        # Stopping waits for the current batch and flushes events: off the loop.
        await asyncio.to_thread(stop_scheduler)
        await asyncio.to_thread(tracking.stop_writer)
        logger.info("dashboard server stopped")


app = st.App(SCRIPT, routes=tracking.routes(), lifespan=lifespan)

# app.py declares every page with st.navigation. Streamlit switches off its
# older pages/-folder mode only once st.navigation has run, so a first visitor
# arriving on a deep link (/sequences) would get that mode; say it up front.
PagesManager.uses_pages_directory = False


def run_server(host: str = "127.0.0.1", port: int = 8501) -> None:
    """Serve the dashboard, its scheduler and the tracking routes until stopped.

    The same path ``streamlit run`` takes for an ``st.App`` script: Streamlit
    reads ``.streamlit/config.toml`` next to ``app.py``, then uvicorn imports
    this module's ``app`` and handles SIGINT and SIGTERM.
    """
    from streamlit import config as streamlit_config
    from streamlit.web import bootstrap

    configure_logging()

    # Tracking links must reach this server: with no public URL configured,
    # they point at the port it really listens on, not the default one.
    if not os.environ.get("SEQUENCER_PUBLIC_URL"):
        os.environ["SEQUENCER_PUBLIC_URL"] = f"http://localhost:{port}"
        get_settings.cache_clear()
    logger.info("tracking links point at %s", get_settings().public_url)
    flags = {
        "server.address": host,
        "server.port": port,
        "server.headless": True,
    }
    streamlit_config._main_script_path = str(SCRIPT)
    bootstrap.load_config_options(flags)
    bootstrap.run_asgi_app(str(SCRIPT), "sequencer.server:app", [], flags)
