"""`blink serve`, `blink build` and `blink import`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import Settings

DEFAULT_REPO = "models/repository"
SETTINGS_FLAGS = {
    "model": "BLINK_MODEL",
    "repository": "BLINK_REPOSITORY",
    "default_model": "BLINK_DEFAULT_MODEL",
    "host": "BLINK_HOST",
    "port": "BLINK_PORT",
    "workers": "BLINK_WORKERS",
    "device": "BLINK_DEVICE",
    "variant": "BLINK_MODEL_VARIANT",
}


def serve(args: argparse.Namespace) -> int:
    # Flags become environment variables so that every uvicorn worker process sees them.
    for flag, env in SETTINGS_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)

    from app.bundle import BundleError
    from app.engine import EngineError
    from app.settings import Settings

    try:
        settings = Settings()
    except ValueError as exc:
        print(f"blink: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:  # fail here, with one clear line, rather than inside every worker
        if settings.repository is None:
            check_bundle(settings)
        elif not settings.repository.is_dir():
            raise BundleError(f"model repository not found: {settings.repository} is no directory")
    except (BundleError, EngineError) as exc:
        print(f"blink: cannot serve: {exc}", file=sys.stderr)
        return 2
    made = prepare_multiprocess_metrics() if settings.workers > 1 else None
    try:
        run_uvicorn(settings)
    finally:
        if made is not None:  # a directory we made; one the user named is theirs
            shutil.rmtree(made, ignore_errors=True)
    return 0


def run_uvicorn(settings: Settings) -> None:
    import uvicorn

    from app.logs import log_config

    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,  # names the software to every client; nothing needs it
        log_config=log_config(settings.log_level),
        log_level=settings.log_level,
        # uvicorn annotates int but waits with asyncio, which takes any float
        timeout_graceful_shutdown=max(1.0, settings.request_timeout_ms / 1000 + 1),  # type: ignore[arg-type]
    )


def check_bundle(settings: Settings) -> None:
    """Open the session the workers will open: a bundle ONNX Runtime cannot load fails here.

    Left to the workers, it would end in a traceback per worker, and with several workers
    uvicorn's parent exits 0.
    """
    from app.bundle import BundleError, load_bundle
    from app.engine import Engine

    bundle = load_bundle(settings.model)
    engine = Engine(
        bundle,
        device=settings.device,
        variant=settings.model_variant,
        threads=1,
        max_batch_size=settings.max_batch_size,
    )
    # a label per output: fewer would fail every request, more would name classes never given
    (output,) = [o for o in engine.session.get_outputs() if o.name == engine.output_name]
    classes, labels = output.shape[-1], len(bundle.manifest.labels)
    if isinstance(classes, int) and classes != labels:
        raise BundleError(
            f"{bundle.variant_path(engine.variant)} outputs {classes} classes "
            f"but the manifest has {labels} labels"
        )


def prepare_multiprocess_metrics() -> str | None:
    """Give the workers a fresh, shared metrics directory before any of them starts.

    Returns the directory if it was made here (a temporary one), None if the user named it.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        Path(directory).mkdir(parents=True)
        return None
    made = tempfile.mkdtemp(prefix="blink-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


def promote_version(args: argparse.Namespace) -> int:
    """`blink promote MODEL VERSION`: move the model's `latest` (the service reloads it)."""
    from app.bundle import BundleError, promote

    home = Path(args.model)
    if not home.is_dir() and os.sep not in args.model:  # a name in the repository
        repository = args.repository or Path(os.environ.get("BLINK_REPOSITORY") or DEFAULT_REPO)
        home = repository / args.model
    try:
        previous = promote(home, args.version)
    except BundleError as exc:
        print(f"blink: cannot promote: {exc}", file=sys.stderr)
        return 2
    print(
        f"{home}: latest -> {args.version} (was {previous or 'nothing'}); to roll back: "
        f"blink promote {args.model} {previous}"
        if previous
        else f"{home}: latest -> {args.version}"
    )
    return 0


def build(argv: list[str]) -> int:
    from models.commands.build import main as build_main

    return build_main(argv)


def import_model(argv: list[str]) -> int:
    from models.commands.imports import main as import_main

    return import_main(argv)


def parser() -> argparse.ArgumentParser:
    from app.settings import DEVICES, VARIANTS

    root = argparse.ArgumentParser(prog="blink", description="Blink image classification service")
    commands = root.add_subparsers(dest="command")
    run = commands.add_parser("serve", help="serve a model bundle (or a repository) over HTTP")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="bundle directory or <repository>/<name>")
    source.add_argument(
        "--repository", type=Path, help="serve every <repository>/<name> bundle (at `latest`)"
    )
    run.add_argument("--default-model", help="the model POST /classify answers with")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.add_argument("--workers", type=int)
    run.add_argument("--device", choices=DEVICES)
    run.add_argument("--variant", choices=VARIANTS)
    move = commands.add_parser(
        "promote", help="make a version the one a model serves (moves its latest pointer)"
    )
    move.add_argument("model", help="a model's name in the repository, or its <repository>/<name>")
    move.add_argument("version", help="the version directory to serve; the previous one rolls back")
    move.add_argument(
        "--repository", type=Path, help=f"default: $BLINK_REPOSITORY or {DEFAULT_REPO}"
    )
    commands.add_parser("build", help="train, quantize and export a model bundle", add_help=False)
    commands.add_parser(
        "import", help="turn an ONNX image classifier into a model bundle", add_help=False
    )
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "build":
        return build(argv[1:])
    if argv and argv[0] == "import":
        return import_model(argv[1:])
    args = parser().parse_args(argv or ["serve"])
    if args.command == "promote":
        return promote_version(args)
    return serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
