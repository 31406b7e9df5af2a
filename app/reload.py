"""Model reload without a restart: a new version is loaded, verified and warmed up beside the
serving one, then swapped in with one assignment.

One `ModelHost` per served model. `host.current` is its serving `ModelService`. Every request
reads it once, at arrival, and keeps that object to its end, so requests in flight finish on the
version they started on; the replaced version stops taking requests at the swap, drains its
queue and closes. A version that fails to load (manifest, hashes, ONNX Runtime) or to warm up is
logged, counted in `blink_model_reloads_total{model,result}` and dropped; the serving one never
stops.

Triggers, all of which end in `ModelHost.reload` (app/registry.py arms them): SIGHUP to the
worker process, the admin endpoint (app/routes/admin.py, off unless a token is set) and, every
`watch_interval_s`, a look at where each model's `latest` pointer leads. Each worker process
reloads on its own; with several workers the watcher is what moves them all
(docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from starlette.types import Scope

from app.bundle import MANIFEST_FILE, BundleError, load_bundle, resolve_bundle_dir
from app.candidate import CANARY, SHADOW, Canary, Shadow, candidate_settings, lower_priority
from app.candidate_spec import candidate_directory
from app.metrics import ModelMetrics
from app.service import ModelService, Shared
from app.settings import Settings

log = logging.getLogger("blink.reload")
T = TypeVar("T")
BACKGROUND_NICE = 10  # a reload's thread gets roughly a tenth of a core the serving one wants


@dataclass(frozen=True)
class ReloadOutcome:
    result: str  # one of app.metrics.RELOAD_RESULTS
    version: str  # the version serving after the attempt
    previous: str
    seconds: float
    cpu_seconds: float  # what loading and warming the new version cost in CPU
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "version": self.version,
            "previous": self.previous,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "error": self.error,
        }


def cpu_timed(function: Callable[..., T], total: list[float]) -> Callable[..., T]:
    """`function`, adding the CPU time of its thread to `total[0]`."""

    def timed(*args: object) -> T:
        started = time.thread_time()
        try:
            return function(*args)
        finally:
            total[0] += time.thread_time() - started

    return timed


def in_thread(function: Callable[..., T], *args: object) -> asyncio.Future[T]:
    return asyncio.get_running_loop().run_in_executor(None, function, *args)


def low_priority(function: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """Run `function` in a thread of its own at a lower CPU priority than the serving threads.

    On Linux a nice value set by thread id applies to that thread alone, and cannot be lowered
    again without privileges: hence a fresh thread each time, never one from a shared pool.
    With one ONNX Runtime thread the session computes in its caller, so a warm-up here yields
    the core to the version serving; with more, the session's own threads (made at normal
    priority by `in_thread`) do the work.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if future.done():  # cancelled: shutting down
            return
        if error is None:
            future.set_result(result)  # type: ignore[arg-type]
        else:
            future.set_exception(error)

    def work() -> None:
        lower_priority(BACKGROUND_NICE)
        try:
            result = function(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="blink-reload", daemon=True).start()
    return future


class ModelHost:
    """One served model: which version serves (`current`) and the versions still draining."""

    def __init__(
        self,
        source: Path,
        settings: Settings,
        metrics: ModelMetrics,
        shared: Shared,
        first: ModelService,
    ) -> None:
        self.name = metrics.name
        self.source = source  # the bundle, or the <repository>/<name> directory holding `latest`
        self.settings = settings
        self.metrics = metrics
        self.shared = shared
        self._lock = asyncio.Lock()  # one reload at a time
        self._draining: set[ModelService] = set()
        self._retirements: set[asyncio.Task[None]] = set()
        # The last target that failed, with its manifest's mtime: the watcher does not retry it
        # every interval, only once it changes (or the pointer moves on).
        self._failed: tuple[Path, float] | None = None
        # The version each request takes at arrival; no other long-lived reference to it, so
        # that a reload can free it.
        self.current = first
        # Candidates beside it (app/candidate.py); the serving version holds the shadow too,
        # where the request path looks for it.
        self.shadow: Shadow | None = None
        self.canary: Canary | None = None
        self.candidate_errors: dict[str, str] = {}  # role -> why the one a setting named failed
        first.publish()
        # Single-process, prometheus_client reads these at scrape time: requests pay nothing.
        metrics.watch(
            lambda: sum(s.batcher.queue_depth for s in self._live()),
            lambda: sum(s.active_requests for s in self._live()),
        )

    def _live(self) -> list[ModelService]:
        return [self.current, *self._draining]

    def serving(self, headers: list[tuple[bytes, bytes]]) -> ModelService:
        """The version that answers a request: the canary for its share, else the current."""
        canary = self.canary
        if canary is None:
            return self.current
        return canary.choose(self.current, headers)

    def answering(self, scope: Scope, version: str | None) -> ModelService:
        """The version a V2 request names (the canary's, or else the current one, which
        refuses any other), or without one as `serving` chooses."""
        if version is None:
            return self.serving(scope["headers"])
        canary = self.canary
        if canary is not None and canary.service.model_fields["version"] == version:
            return canary.service
        return self.current

    def candidates(self) -> dict[str, dict[str, Any] | None]:
        """The shadow and canary running beside the serving version, described (or None)."""
        return {
            SHADOW: self.shadow.describe() if self.shadow else None,
            CANARY: self.canary.describe() if self.canary else None,
        }

    def monitored(self) -> list[ModelService]:
        """The versions whose answers are counted: the current one and any candidates."""
        services = [self.current]
        if self.shadow is not None:
            services.append(self.shadow.service)
        if self.canary is not None:
            services.append(self.canary.service)
        return services

    # -- candidates -------------------------------------------------------------------------

    async def start_candidate(self, role: str, candidate: str, fraction: float) -> None:
        """Load, warm up and start a shadow or canary (replacing one already running).

        BundleError or the engine's error when it cannot serve; then nothing changes."""
        async with self._lock:
            directory = candidate_directory(self.source, candidate)
            service = await self._open_candidate(role, directory)
            await self._stop_candidate(role, forget=False)  # its series go on, the new one's
            if role == SHADOW:
                self.shadow = Shadow(service, self.current, fraction, candidate)
                self.current.shadow = self.shadow
            else:
                key_header = self.settings.canary_key_header
                self.canary = Canary(service, fraction, candidate, key_header)
            self.candidate_errors.pop(role, None)
            log.info(
                f"{role} started",
                extra={"model": self.name, "candidate": candidate, "fraction": fraction},
            )

    async def stop_candidate(self, role: str) -> bool:
        """Stop a shadow or canary; False if none ran."""
        async with self._lock:
            return await self._stop_candidate(role)

    async def _open_candidate(self, role: str, directory: Path) -> ModelService:
        started = time.perf_counter()
        settings = candidate_settings(self.settings, role)
        metrics = self.metrics.family.for_model(f"{self.name}:{role}")
        bundle = await run_in_background(self.settings, load_bundle, directory)
        open_service = partial(ModelService, name=self.name)
        service = await run_in_background(
            self.settings, open_service, settings, metrics, self.shared, bundle
        )
        try:
            await run_in_background(self.settings, service.warm_up_engine)
        except Exception:
            await service.close()
            self.metrics.family.forget_model(metrics.name)
            raise
        service.mark_ready(started)
        metrics.engine_slots.set(settings.engine_slots)
        metrics.watch(lambda: service.batcher.queue_depth, lambda: service.active_requests)
        return service

    async def _stop_candidate(self, role: str, *, forget: bool = True) -> bool:
        running: Shadow | Canary | None
        if role == SHADOW:
            running, self.shadow = self.shadow, None
            self.current.shadow = None
        else:
            running, self.canary = self.canary, None
        if running is None:
            return False
        await running.close()  # requests it took are answered first
        if forget:
            self.metrics.family.forget_model(f"{self.name}:{role}")
        log.info(f"{role} stopped", extra={"model": self.name})
        return True

    async def _stop_promoted(self) -> None:
        """A candidate whose version now serves has done its work."""
        serving = self.current.bundle.directory.resolve()
        for role, running in ((SHADOW, self.shadow), (CANARY, self.canary)):
            if running is not None and running.service.bundle.directory.resolve() == serving:
                await self._stop_candidate(role)

    # -- reloading --------------------------------------------------------------------------

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Load what `source` names now and swap it in if it is new and it warms up."""
        async with self._lock:
            return await self._reload(trigger)

    async def _reload(self, trigger: str) -> ReloadOutcome:
        started = time.perf_counter()
        current = self.current
        previous = current.model_fields["version"]

        cpu = [0.0]

        def outcome(result: str, error: str | None = None) -> ReloadOutcome:
            self.metrics.reloaded(result)
            done = ReloadOutcome(
                result, self.current.model_fields["version"], previous,
                time.perf_counter() - started, cpu[0], error,
            )  # fmt: skip
            level = logging.WARNING if error else logging.INFO
            log.log(
                level, "reload", extra={"model": self.name, "trigger": trigger, **done.as_dict()}
            )
            return done

        def background(function: Callable[..., T], *args: object) -> asyncio.Future[T]:
            return run_in_background(self.settings, cpu_timed(function, cpu), *args)

        try:
            bundle = await background(load_bundle, self.source)
            if self._serving(bundle.directory, bundle.manifest.version, current):
                return outcome("unchanged")
            candidate = await background(
                ModelService, self.settings, self.metrics, self.shared, bundle
            )
        except Exception as exc:  # BundleError, EngineError, OSError; whatever it is, not served
            self._remember_failure()
            return outcome("load_failed", str(exc))
        try:
            await background(candidate.warm_up_engine)
        except Exception as exc:
            candidate.warm_up_error = str(exc)
            self._remember_failure()
            await candidate.close()
            return outcome("warm_up_failed", str(exc))
        candidate.mark_ready(started)
        self._swap(candidate)
        self._failed = None
        await self._stop_promoted()
        return outcome("success")

    def _serving(self, directory: Path, version: str, current: ModelService) -> bool:
        return (
            directory.resolve() == current.bundle.directory.resolve()
            and version == current.model_fields["version"]
            and current.warm_up_error is None
        )

    def _swap(self, candidate: ModelService) -> None:
        old = self.current
        if old.shadow is not None:  # the shadow now compares with the new version
            old.shadow.follow(candidate)
            candidate.shadow = old.shadow
        self.current = candidate  # the swap: requests arriving from now on take the new one
        old.unpublish()
        candidate.publish()
        self._retire(old)

    def _retire(self, old: ModelService) -> None:
        self._draining.add(old)
        task = asyncio.create_task(self._drain(old))
        self._retirements.add(task)
        task.add_done_callback(self._retirements.discard)

    async def _drain(self, old: ModelService) -> None:
        """Let the old version answer everything it accepted, then free it."""
        try:
            await old.close()
        finally:
            self._draining.discard(old)
            version = old.model_fields["version"]
            log.info("retired", extra={"model": self.name, "version": version})

    def _remember_failure(self) -> None:
        with contextlib.suppress(BundleError, OSError):
            directory = resolve_bundle_dir(self.source)
            self._failed = (directory, (directory / MANIFEST_FILE).stat().st_mtime)

    def pointer_moved(self) -> bool:
        """Whether `source` now leads to another bundle than the serving one."""
        try:
            directory = resolve_bundle_dir(self.source)
            mtime = (directory / MANIFEST_FILE).stat().st_mtime
        except (BundleError, OSError):
            return False  # mid-move or gone: the next look decides
        if self._failed == (directory, mtime):
            return False
        return directory.resolve() != self.current.bundle.directory.resolve()

    async def close(self) -> None:
        """Stop serving: answer everything accepted, by every version, then free them."""
        async with self._lock:  # a reload in progress finishes first
            await self._stop_candidate(SHADOW)
            await self._stop_candidate(CANARY)
            current = self.current
            current.unpublish()
            await current.close()
            await asyncio.gather(*self._retirements, return_exceptions=True)


def run_in_background(
    settings: Settings, function: Callable[..., T], *args: object
) -> asyncio.Future[T]:
    """Loading, hashing and warming up take CPU the serving versions need: at one intra-op
    thread, at a lower priority; with more, in the default pool (the session's own threads
    do the work)."""
    runner = low_priority if settings.intra_op_threads() == 1 else in_thread
    return runner(function, *args)
