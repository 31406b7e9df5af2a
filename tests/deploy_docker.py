"""A Docker engine and stand-in base images for the image test, on a machine with no registry.

`FROM python:3.11-slim-bookworm` cannot be pulled here, so the test builds a stand-in: a minimal
Debian bookworm (`debootstrap`) with Debian's python3 and python3-venv, this machine's CA
certificates and the parts of its pip configuration that mean the same inside a container, so
pip in the image build reaches the package index the way pip on the host does. Wheels that the
host keeps in local `find-links` directories (the CPU build of torch) go into a second image,
which the Dockerfile mounts as its `wheels` stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from loadtest.processes import stop_process

SUITE = "bookworm"
MIRROR = os.environ.get("BLINK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
# pip options that mean the same inside a container; local paths and file:// indexes do not.
PIP_NETWORK_OPTIONS = ("index-url", "extra-index-url", "trusted-host", "default-timeout", "timeout")
# The debootstrap root is kept here as a tar: a later run on this machine skips debootstrap.
CACHE_DIR = Path(
    os.environ.get("BLINK_IMAGE_TEST_CACHE", Path.home() / ".cache" / "blink" / "image-test")
)


class DockerUnavailable(Exception):
    """No Docker engine can run here; the message says why."""


@dataclass
class Docker:
    """A Docker client bound to an engine; `build` uses BuildKit."""

    client: str
    build_argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.client, *args], env=self.env, capture_output=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"docker {shlex.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout.decode(errors='replace')[-4000:]}\n"
                f"{result.stderr.decode(errors='replace')[-4000:]}"
            )
        return result

    def out(self, *args: str, timeout: float = 120) -> str:
        return self(*args, timeout=timeout).stdout.decode().strip()

    def has_image(self, tag: str) -> bool:
        return self("image", "inspect", tag, check=False).returncode == 0

    def build(self, context: Path, *args: str, timeout: float = 1500) -> str:
        """Runs the build; returns its log (BuildKit's plain progress output)."""
        result = subprocess.run(
            [*self.build_argv, "--progress", "plain", *args, str(context)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        log = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"docker build failed ({result.returncode}):\n{log[-12000:]}")
        return log


def find_docker() -> Docker:
    """A client that can build with BuildKit: buildx, or a pre-23 client with DOCKER_BUILDKIT=1.

    A client from 23 on without the buildx plugin falls back to the legacy builder, which
    knows no `RUN --mount`; Debian's docker.io (20.10) still has BuildKit built in.
    """
    candidates = dict.fromkeys(p for p in (shutil.which("docker"), "/usr/bin/docker") if p)
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    for client in candidates:
        if not os.access(client, os.X_OK):
            continue
        buildx = subprocess.run([client, "buildx", "version"], capture_output=True, env=env)
        if buildx.returncode == 0:
            return Docker(client, [client, "buildx", "build", "--load"], env)
        version = subprocess.run(
            [client, "version", "--format", "{{.Client.Version}}"],
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip()
        if version and int(version.split(".")[0]) < 23:
            return Docker(client, [client, "build"], env)
    raise DockerUnavailable(
        "no Docker client that builds with BuildKit (install Debian's docker.io, or buildx)"
    )


@contextlib.contextmanager
def docker_engine(log_dir: Path) -> Iterator[Docker]:
    """The running engine, or `dockerd --storage-driver=vfs` started here and stopped after."""
    docker = find_docker()
    if docker("info", check=False, timeout=30).returncode == 0:
        yield docker
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise DockerUnavailable("no Docker engine (Debian: apt-get install docker.io)")
    if os.geteuid() != 0:
        raise DockerUnavailable("no Docker engine running, and only root can start dockerd")
    log_path = log_dir / "dockerd.log"
    with log_path.open("wb") as log:
        # vfs works on any file system (overlayfs does not nest in every sandbox).
        process = subprocess.Popen(
            [dockerd, "--storage-driver=vfs"], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_engine(docker, process, log_path)
        yield docker
    finally:
        stop_process(process, timeout=60)


def wait_for_engine(docker: Docker, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DockerUnavailable(
                f"dockerd exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        if docker("info", check=False, timeout=30).returncode == 0:
            return
        time.sleep(0.5)
    raise DockerUnavailable(f"dockerd did not answer in 60 s:\n{log_path.read_text()[-3000:]}")


# -- the host's pip configuration ------------------------------------------------------------


def host_pip_config() -> dict[str, str]:
    """`pip config list` as {option: value}; environment variables win over files, as in pip."""
    listing = subprocess.run(
        ["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        scope, _, option = key.rpartition(".")
        (env if scope == ":env:" else files)[option] = value.strip().strip("'\"")
    return {**files, **env}


def container_pip_conf(config: dict[str, str]) -> str:
    """The host's network options, with the CA bundle at the path it has in the image."""
    lines = ["[global]", f"cert = {CA_BUNDLE}"]
    for option in PIP_NETWORK_OPTIONS:
        value = config.get(option)
        if option.endswith("index-url") and value:
            value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
        if value:
            lines.append(f"{option} = {value}")
    return "\n".join(lines) + "\n"


def local_wheels(config: dict[str, str]) -> list[Path]:
    """Wheels in the host's local find-links directories (http ones are in the pip.conf)."""
    wheels: list[Path] = []
    for location in config.get("find-links", "").split():
        directory = Path(location.removeprefix("file://"))
        if directory.is_dir():
            wheels.extend(sorted(directory.glob("*.whl")))
    return wheels


# -- stand-in images ---------------------------------------------------------------------------


def standin_base(docker: Docker) -> str:
    """Tag of the stand-in base image: from the engine, the cached tar, or debootstrap."""
    pip_conf = container_pip_conf(host_pip_config())
    certificates = local_certificates()
    key = digest(SUITE, MIRROR, *BASE_PACKAGES, pip_conf, CA_BUNDLE, *certificates)
    tag = f"blink-standin-base:{SUITE}-{key}"
    if docker.has_image(tag):
        return tag
    cached = CACHE_DIR / f"standin-base-{SUITE}-{key}.tar"
    if not cached.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="standin-", dir=CACHE_DIR) as work:
            root = Path(work) / "root"
            try:
                bootstrap(root)
            finally:  # an interrupted debootstrap leaves /proc mounted in the root
                unmount_under(root)
            configure(root, pip_conf, certificates)
            partial = cached.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
            partial.rename(cached)  # only a complete tar counts as cached
    with cached.open("rb") as tar:
        docker_import(docker, tag, lambda stdin: shutil.copyfileobj(tar, stdin, 1 << 20))
    return tag


def bootstrap(root: Path) -> None:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise DockerUnavailable("no debootstrap to build the stand-in base (apt-get install it)")
    packages = ",".join(BASE_PACKAGES)
    argv = [debootstrap, "--variant=minbase", f"--include={packages}", SUITE, str(root), MIRROR]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def unmount_under(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in reversed(mounts):  # innermost first
        if mount.startswith(f"{root}/"):
            subprocess.run(["umount", "--lazy", mount], check=False)


def configure(root: Path, pip_conf: str, certificates: list[Path]) -> None:
    """Make the root look like python:slim: no apt caches; and trust what the host trusts."""
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        shutil.rmtree(root / cache, ignore_errors=True)
        (root / cache / "partial").mkdir(parents=True)
    # The host's trust store, and its local CAs, so an update-ca-certificates in the image
    # rebuilds the bundle with them.
    shutil.copyfile(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
    for certificate in certificates:
        target = root / certificate.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(certificate, target)
    (root / "etc/pip.conf").write_text(pip_conf)


def standin_wheels(docker: Docker) -> str | None:
    """Tag of an image holding the host's local wheels at /; None if it has none."""
    wheels = local_wheels(host_pip_config())
    if not wheels:
        return None
    key = digest(*(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in wheels))
    tag = f"blink-standin-wheels:{key}"
    if not docker.has_image(tag):

        def write(stdin: IO[bytes]) -> None:
            with tarfile.open(fileobj=stdin, mode="w|") as tar:
                for wheel in wheels:
                    tar.add(wheel, arcname=wheel.name)

        docker_import(docker, tag, write)
    return tag


def docker_import(docker: Docker, tag: str, write_tar: Callable[[IO[bytes]], None]) -> None:
    """`docker import` of the tar stream that `write_tar` writes."""
    process = subprocess.Popen(
        [docker.client, "import", "-", tag],
        env=docker.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdin is not None and process.stdout is not None
    with process.stdin:
        write_tar(process.stdin)
    with process.stdout:
        output = process.stdout.read().decode(errors="replace")
    if process.wait(timeout=600) != 0:
        raise RuntimeError(f"docker import {tag} failed:\n{output}")


def local_certificates() -> list[Path]:
    return sorted(LOCAL_CA_DIR.glob("*.crt")) if LOCAL_CA_DIR.is_dir() else []


def digest(*parts: str | bytes | Path) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            part = part.read_bytes()
        hasher.update(part if isinstance(part, bytes) else part.encode())
    return hasher.hexdigest()[:12]
