"""The models one process serves: one `ModelHost` each, by name, and what they share.

`--model PATH` serves one bundle under its manifest's name. `--repository DIR` serves every
`DIR/<name>` that holds a bundle (a `latest` pointer or a manifest), under the directory's name,
each at its `latest` version. A bundle that fails to load or warm up is reported (`failed`, in
/readyz, /v1/models and `blink_model_reloads_total{result}`) and never stops the others.

The watcher (every `watch_interval_s`) and SIGHUP reload each model whose `latest` moved, and in
repository mode add the bundles that appeared and unload those that went (after their requests
in progress finish). The default model, which answers `POST /classify`, is the one named by
`default_model`, or the only one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from app.bundle import LATEST_POINTER, MANIFEST_FILE, BundleError, load_bundle, resolve_bundle_dir
from app.cache import ResponseCache
from app.candidate import CANARY, SHADOW
from app.candidate_spec import parse_candidates
from app.errors import ModelNotFound
from app.metrics import ServiceMetrics
from app.reload import ModelHost, ReloadOutcome, run_in_background
from app.service import ModelService, Shared, worker_list, workers_not_ready
from app.settings import Settings

log = logging.getLogger("blink.registry")
MONITOR_INTERVAL_S = 1.0  # how often answers are counted and drift measured


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hosts: dict[str, ModelHost] = {}
        self.default: ModelHost | None = None  # answers POST /classify
        self.failed: dict[str, str] = {}  # name -> why it is not served
        # a failed bundle is retried once its manifest changes, not every interval
        self._failed_at: dict[str, tuple[Path, float] | None] = {}
        self._tasks: list[asyncio.Task[object]] = []
        self._lock = asyncio.Lock()  # one scan (adds and removals) at a time
        self._signal = False
        self._candidates_pending = bool(settings.shadow or settings.canary)
        self.metrics: ServiceMetrics
        self.shared: Shared

    # -- start and stop ---------------------------------------------------------------------

    def open(self, metrics: ServiceMetrics) -> None:
        """Load every model (at start-up, before serving); a single `--model` that fails raises."""
        self.metrics = metrics
        size = self.settings.cache_bytes
        self.shared = Shared(self.settings, ResponseCache(size, metrics) if size else None)
        if self.settings.repository is None:
            bundle = load_bundle(self.settings.model)
            name = bundle.manifest.name
            self._install(name, self.settings.model, self._service(name, bundle))
        else:
            for name, source in self.sources().items():
                try:
                    self._install(name, source, self._service(name, load_bundle(source)))
                except Exception as exc:  # reported; the other models are served
                    self._fail(name, source, "load_failed", exc)
        self._choose_default()
        self._publish_ready()

    async def warm_up(self) -> None:
        """Warm every model up, one at a time (together they would fight over the cores)."""
        for host in list(self.hosts.values()):
            await host.current.warm_up()
            if host.current.warm_up_error is not None:
                self._fail_warm_up(host)
        await self.start_candidates()

    async def start_candidates(self) -> None:
        """The shadows and canaries the settings name; one that fails is reported on its model
        (`candidate_errors` in /v1/models) and the model serves without it."""
        for role in (SHADOW, CANARY):
            text = getattr(self.settings, role)
            for spec in parse_candidates(text, fraction_required=role == CANARY):
                host = self.hosts.get(spec.model) if spec.model else self.default
                if host is None:
                    log.error(
                        f"{role} not started: no such model",
                        extra={"model": spec.model or "(default)", "candidate": spec.candidate},
                    )
                    continue
                try:
                    await host.start_candidate(role, spec.candidate, spec.fraction)
                except Exception as exc:
                    host.candidate_errors[role] = f"{spec.candidate}: {exc}"
                    log.error(
                        f"{role} not started",
                        extra={"model": host.name, "candidate": spec.candidate, "error": str(exc)},
                    )
        self._candidates_pending = False
        self._publish_ready()

    def start(self) -> None:
        """Arm the triggers this process has: the watcher (if set) and SIGHUP; and the
        monitor's flushes."""
        self._tasks.append(asyncio.create_task(self.monitor_answers(MONITOR_INTERVAL_S)))
        if self.settings.watch_interval_s > 0:
            self._tasks.append(asyncio.create_task(self.watch(self.settings.watch_interval_s)))
        # Only the main thread may own signal handlers (in-process test apps run elsewhere too).
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_signal)
            self._signal = True
            log.debug("SIGHUP reloads the models", extra={"pid": os.getpid()})

    async def close(self) -> None:
        if self._signal:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(host.close() for host in self.hosts.values()))
        self.shared.close()

    # -- lookups ----------------------------------------------------------------------------

    def host(self, name: str) -> ModelHost:
        """The model called `name`; ModelNotFound (404) naming those served, if none is."""
        host = self.hosts.get(name)
        if host is None:
            raise ModelNotFound(self.unknown_message(name))
        return host

    def unknown_message(self, name: str) -> str:
        served = ", ".join(sorted(self.hosts)) or "none"
        why = f" ({self.failed[name]})" if name in self.failed else ""
        return f"unknown model {name[:64]!r}{why}; served: {served}"

    def no_default_message(self, how: str = "POST /models/{name}/classify") -> str:
        """Why there is no default model, and `how` to name one instead."""
        served = ", ".join(sorted(self.hosts)) or "none"
        if self.settings.default_model:
            return (
                f"the default model {self.settings.default_model!r} is not served; "
                f"{how} with one of: {served}"
            )
        return (
            "several models are served and none is the default (set BLINK_DEFAULT_MODEL): "
            f"{how} with one of: {served}"
        )

    # -- readiness --------------------------------------------------------------------------

    def own_not_ready_reason(self) -> str | None:
        """Why this worker cannot serve yet: no model serving, or one still warming up.

        A model that failed is reported, not waited for: the others serve."""
        serving = [h for h in self.hosts.values() if h.current.warm_up_error is None]
        warming = [h.name for h in serving if not h.current.ready]
        if warming:
            return f"warming up: {', '.join(sorted(warming))}"
        if self._candidates_pending:  # what the settings name starts before traffic comes
            return "starting the shadow and canary versions"
        if not serving:
            failed = "; ".join(f"{name}: {why}" for name, why in sorted(self.failed.items()))
            return f"no model is served ({failed or 'none found'})"
        return None

    def not_ready_reason(self) -> str | None:
        """/readyz: this worker's reason, then (with several workers) the others'."""
        reason = self.own_not_ready_reason()
        if reason is not None:
            return reason
        return workers_not_ready(self.settings, self.metrics.multiprocess)

    def _publish_ready(self) -> None:
        self.metrics.worker_ready.set(0 if self.own_not_ready_reason() else 1)

    def workers(self) -> list[dict[str, Any]]:
        own = [
            {"name": h.name, "version": h.current.model_fields["version"]}
            for h in sorted(self.hosts.values(), key=lambda h: h.name)
        ]
        return worker_list(own, self.metrics.multiprocess)

    # -- the repository ---------------------------------------------------------------------

    def sources(self) -> dict[str, Path]:
        """`<repository>/<name>` of every directory that holds a bundle, by name."""
        repository = self.settings.repository
        assert repository is not None
        found = {}
        with contextlib.suppress(OSError):  # gone for a moment: nothing is served from it now
            for entry in sorted(repository.iterdir()):
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                pointer = entry / LATEST_POINTER
                if pointer.exists() or pointer.is_symlink() or (entry / MANIFEST_FILE).exists():
                    found[entry.name] = entry
        return found

    async def scan(self, trigger: str) -> list[ReloadOutcome]:
        """Reload the models whose `latest` moved; in a repository, add and remove bundles."""
        async with self._lock:
            outcomes = []
            for host in list(self.hosts.values()):
                if trigger != "watch" or host.pointer_moved():
                    outcome = await host.reload(trigger)
                    if outcome.result == "success":
                        self._forget_failure(host.name)
                    outcomes.append(outcome)
            if self.settings.repository is not None:
                sources = self.sources()
                for name in [n for n in self.hosts if n not in sources]:
                    await self.remove(name)
                for name in [n for n in self.failed if n not in sources]:
                    self._forget_failure(name)
                    self.metrics.forget_model(name)  # its series go with it (blink_ready 0)
                for name, source in sources.items():
                    if name not in self.hosts and self._retry(name, source):
                        await self.add(name, source)
            self._publish_ready()
            return outcomes

    async def add(self, name: str, source: Path) -> None:
        """Load, warm up and start serving a bundle that appeared in the repository."""
        started = time.perf_counter()
        try:
            bundle = await run_in_background(self.settings, load_bundle, source)
            service = await run_in_background(self.settings, self._service, name, bundle)
        except Exception as exc:
            self._fail(name, source, "load_failed", exc)
            return
        try:
            await run_in_background(self.settings, service.warm_up_engine)
        except Exception as exc:
            service.warm_up_error = str(exc)
            await service.close()
            self._fail(name, source, "warm_up_failed", exc)
            return
        service.mark_ready(started)
        self._forget_failure(name)
        self._install(name, source, service)
        self.metrics.for_model(name).reloaded("success")
        self._choose_default()
        log.info("model added", extra={"model": name, "version": service.model_fields["version"]})

    async def remove(self, name: str) -> None:
        """Stop routing to a model whose bundle went; unload it once its requests finish."""
        host = self.hosts.pop(name)
        self._choose_default()
        await host.close()
        self.metrics.forget_model(name)
        if self.shared.cache is not None:
            self.shared.cache.drop_model(name)
        log.info("model removed", extra={"model": name})

    async def monitor_answers(self, interval_s: float) -> None:
        """Count each model's recent answers and measure its drift, off the request path."""
        while True:
            await asyncio.sleep(interval_s)
            for host in list(self.hosts.values()):
                try:
                    for service in host.monitored():
                        service.monitor.flush()
                except Exception:  # a bug must not stop the monitoring of the others
                    log.exception("monitor flush failed", extra={"model": host.name})

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.scan("watch")
            except Exception:  # a bug must not stop the watching
                log.exception("repository scan failed")

    def _on_signal(self) -> None:
        task = asyncio.create_task(self.scan("signal"))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # -- internals --------------------------------------------------------------------------

    def _service(self, name: str, bundle: Any) -> ModelService:
        return ModelService(self.settings, self.metrics.for_model(name), self.shared, bundle)

    def _install(self, name: str, source: Path, service: ModelService) -> None:
        metrics = service.metrics
        self.hosts[name] = ModelHost(source, self.settings, metrics, self.shared, service)

    def _choose_default(self) -> None:
        wanted = self.settings.default_model
        if wanted:
            self.default = self.hosts.get(wanted)
        else:
            self.default = next(iter(self.hosts.values())) if len(self.hosts) == 1 else None

    def _fail(self, name: str, source: Path, result: str, exc: Exception) -> None:
        self.failed[name] = f"{result.replace('_', ' ')}: {exc}"
        self._failed_at[name] = manifest_stamp(source)
        metrics = self.metrics.for_model(name)
        metrics.reloaded(result)
        metrics.ready.set(0)
        log.warning("model not served", extra={"model": name, "error": self.failed[name]})

    def _fail_warm_up(self, host: ModelHost) -> None:
        self.failed[host.name] = f"warm-up failed: {host.current.warm_up_error}"
        host.metrics.reloaded("warm_up_failed")

    def _forget_failure(self, name: str) -> None:
        self.failed.pop(name, None)
        self._failed_at.pop(name, None)

    def _retry(self, name: str, source: Path) -> bool:
        """Whether to try a bundle again: new, or changed since it last failed."""
        if name not in self.failed:
            return True
        return manifest_stamp(source) != self._failed_at.get(name)


def manifest_stamp(source: Path) -> tuple[Path, float] | None:
    """Where `source` leads and its manifest's mtime; None while it leads nowhere."""
    try:
        directory = resolve_bundle_dir(source)
        return directory, (directory / MANIFEST_FILE).stat().st_mtime
    except (BundleError, OSError):
        return None
