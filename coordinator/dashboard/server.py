"""The dashboard's HTTP server: aiohttp on an asyncio loop in a thread of its own.

aiohttp fits the coordinator's process model: the coordinator is a synchronous program whose
gRPC servers run their own thread pools and whose hivemind DHT runs in a child process, so the
dashboard adds one thread with its own event loop, started after the DHT has forked (as the gRPC
servers are) and stopped with the coordinator. State reads run on one worker thread (a
:class:`StateDB` keeps one connection per thread), DHT lookups of the merged model's providers on
another, bounded by the DHT timeout and cached for a few seconds, so a slow DHT never delays the
page's other data.

Read-only: only ``GET`` (and ``HEAD``) routes exist; anything else gets a 4xx JSON
:class:`~coordinator.dashboard.models.ApiError`, and an unexpected error a 500 JSON body (the
traceback goes to the log, never to the client). The page is served with a Content-Security-Policy
that allows only its own script and style, so a value that slipped into markup could still not run.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from coordinator.dashboard import queries
from coordinator.dashboard.address import DEFAULT_HOST, DashboardError, url_of
from coordinator.dashboard.models import ApiError, Identity, Nodes
from coordinator.db import StateDB, StateError

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: the files the page is made of, by URL path, with their content type
PAGE_FILES = {"/": ("index.html", "text/html"), "/dashboard.js": ("dashboard.js", "text/javascript"),
              "/dashboard.css": ("dashboard.css", "text/css")}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ROUND = re.compile(r"^[0-9]{1,9}$")


@dataclass
class DashboardSource:
    """What the dashboard reads: the state DB, the coordinator's identity and, for the merged model's
    providers, ``providers(manifest_hash) -> [(owner public key, address)]`` (a DHT lookup that may
    raise; None: not known) and the coordinator's own public key (to name it among them)."""

    db_path: Path
    identity: Callable[[], Identity]
    providers: Callable[[str], list[tuple[bytes, str]]] | None = None
    coordinator_key: bytes = b""


class DashboardServer:
    """Serves the dashboard of ``source`` on ``host:port`` (see module docstring): ``start()``, then
    :attr:`url`; ``stop()``."""

    def __init__(self, source: DashboardSource, host: str = DEFAULT_HOST, port: int = 0, *,
                 providers_ttl: float = 10.0):
        self.source, self.host, self.port, self.providers_ttl = source, host, port, providers_ttl
        self.db: StateDB | None = None  # opened on the reads thread (one connection per thread)
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umm-dashboard-db")
        self._dht = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umm-dashboard-dht")
        self._providers: tuple[float, str, list[tuple[bytes, str]], str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        if self.address is None:
            raise DashboardError("the dashboard is not serving")
        return url_of(*self.address)

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> DashboardServer:
        """Bind and serve in a thread; :class:`DashboardError` if it cannot bind."""
        started = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(started, failure), name="umm-dashboard",
                                        daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._shutdown_pools()
            raise DashboardError(f"cannot serve the dashboard on {self.host}:{self.port}: {failure[0]}") from None
        logger.info("dashboard at %s", self.url)
        return self

    def _serve(self, started: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            host, port = runner.addresses[0][:2]
            self.address = (self.host if self.host not in ("0.0.0.0", "::") else host, int(port))
        except BaseException as e:
            failure.append(e)
            loop.run_until_complete(runner.cleanup())
            loop.close()
            started.set()
            return
        self._loop = loop
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (bounded by ``timeout``) and close the state DB. Idempotent."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._shutdown_pools()

    def _shutdown_pools(self) -> None:
        if self.db is not None:
            db, self.db = self.db, None
            try:
                self._reads.submit(db.close).result(timeout=5)
            except Exception:  # a hung read: its connection goes with the process
                pass
        self._reads.shutdown(wait=False, cancel_futures=True)
        self._dht.shutdown(wait=False, cancel_futures=True)

    # the web app -----------------------------------------------------------------------------------
    def app(self) -> Any:
        """The aiohttp application: the page, the API, the error and header middleware."""
        app = web.Application(middlewares=[_errors], client_max_size=1024)
        for path in PAGE_FILES:
            app.router.add_get(path, self._page)
        api = {"/api/identity": self._identity, "/api/leaderboard": self._leaderboard, "/api/rounds": self._rounds,
               "/api/rounds/{n}": self._round, "/api/curves/{n}": self._curves, "/api/nodes": self._nodes}
        for path, handler in api.items():
            app.router.add_get(path, handler)
        app.on_response_prepare.append(_headers)
        return app

    async def _page(self, request: Any) -> Any:
        name, content_type = PAGE_FILES[request.path]
        return web.Response(body=(STATIC / name).read_bytes(), content_type=content_type, charset="utf-8")

    async def _read(self, fn: Callable[[StateDB], BaseModel | None], missing: str = "") -> Any:
        """``fn(db)`` on the reads thread, as JSON; 404 with ``missing`` when it returns None, 503
        before the coordinator wrote its state."""
        try:
            result = await self._read_value(fn)
        except StateError as e:
            logger.warning("dashboard: %s", e)
            raise web.HTTPServiceUnavailable(reason="the state database cannot be read now") from None
        if result is None:
            raise web.HTTPNotFound(reason=missing)
        return _json(result)

    async def _identity(self, request: Any) -> Any:
        return _json(self.source.identity())

    async def _leaderboard(self, request: Any) -> Any:
        return await self._read(queries.leaderboard)

    async def _rounds(self, request: Any) -> Any:
        limit = _int_param(request.query.get("limit", "0"), "limit", 0, 10_000)
        return await self._read(lambda db: queries.rounds(db, limit))

    async def _round(self, request: Any) -> Any:
        n = _round_number(request.match_info["n"])
        return await self._read(lambda db: queries.round_detail(db, n), f"no round {n}")

    async def _curves(self, request: Any) -> Any:
        n = _round_number(request.match_info["n"])
        return await self._read(lambda db: queries.curves(db, n), f"no round {n}")

    async def _nodes(self, request: Any) -> Any:
        h = await self._read_value(queries.merged_hash)
        providers, error = await self._merged_providers(h)
        return await self._read(lambda db: Nodes(
            merged=queries.model_ref(h, {e.manifest_hash: e for e in db.experts()}) if h else None,
            providers=queries.provider_nodes(db, providers, self.source.coordinator_key),
            providers_error=error, experts=queries.expert_nodes(db)))

    async def _read_value(self, fn: Callable[[StateDB], Any]) -> Any:
        """``fn(db)`` on the reads thread; 503 before the coordinator wrote its state."""
        loop = asyncio.get_running_loop()
        if self.db is None and self.source.db_path.exists():
            self.db = await loop.run_in_executor(self._reads, StateDB, self.source.db_path)
        if self.db is None:
            raise web.HTTPServiceUnavailable(reason="the coordinator has no state yet")
        return await loop.run_in_executor(self._reads, fn, self.db)

    async def _merged_providers(self, manifest_hash: str) -> tuple[list[tuple[bytes, str]], str]:
        """The DHT's providers of ``manifest_hash`` and an error text, cached ``providers_ttl`` seconds."""
        if not manifest_hash or self.source.providers is None:
            return [], "" if manifest_hash else "no merged model published yet"
        cached = self._providers
        if cached is not None and cached[1] == manifest_hash and time.monotonic() - cached[0] < self.providers_ttl:
            return cached[2], cached[3]
        try:
            found = await asyncio.get_running_loop().run_in_executor(self._dht, self.source.providers, manifest_hash)
            error = ""
        except Exception as e:  # the DHT is down or slow: shown, not fatal
            found, error = [], f"provider records could not be read: {type(e).__name__}: {e}"[:500]
        self._providers = (time.monotonic(), manifest_hash, found, error)
        return found, error


def _json(model: BaseModel, status: int = 200) -> Any:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


def _int_param(text: str, name: str, low: int, high: int) -> int:
    if not _ROUND.match(text) or not low <= int(text) <= high:
        raise web.HTTPBadRequest(reason=f"{name} must be an integer from {low} to {high}")
    return int(text)


def _round_number(text: str) -> int:
    return _int_param(text, "the round number", 1, 10**9 - 1)


async def _headers(request: Any, response: Any) -> None:
    response.headers.update(HEADERS)


def _error(status: int, text: str) -> Any:
    return _json(ApiError(status=status, error=text), status=status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every refusal as a JSON :class:`ApiError`; an unexpected error as a 500 without its traceback."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)
    except Exception:
        logger.exception("dashboard: %s %s failed", request.method, request.path)
        return _error(500, "internal error; the coordinator's log says more")


def for_coordinator(coordinator: Any, bind: str) -> DashboardServer:
    """A started dashboard of a started :class:`coordinator.app.Coordinator` on ``bind`` (HOST:PORT)."""
    from coordinator.dashboard.address import parse_bind
    from umm import __version__

    c, cfg = coordinator, coordinator.config

    def identity() -> Identity:
        return Identity(network=cfg.network, public_key=c.public_key_text, checkpoint_address=c.address,
                        status_address=c.status_address, version=__version__)

    def providers(manifest_hash: str) -> list[tuple[bytes, str]]:
        return [(owner, e.record.address) for owner, e in c.records.providers(manifest_hash).items()]

    host, port = parse_bind(bind)
    source = DashboardSource(db_path=c.db.path, identity=identity, providers=providers,
                             coordinator_key=c.public_key)
    return DashboardServer(source, host, port, providers_ttl=min(10.0, cfg.refresh_period)).start()
