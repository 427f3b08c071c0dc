"""The container image, built and run with podman (issue 18): the Containerfile builds on a Debian 12 base; the
image answers `--help`; the daemon comes up on its built-in homeserver and prints how to connect; a prompt sent
with cchat inside the container is answered (by the tests' scripted model, on the host: host networking); its
HEALTHCHECK passes; a new container on the same volume finds the accounts and the room's conversation again;
SIGTERM ends each with exit code 0. And the README's run command on stock Debian: in the bare base image with only
what the README lists installed, a fresh clone's `scripts/run`, as an unprivileged user, brings the daemon up.

Needs root (rootful podman; CI runs as root); installs podman, runc and debootstrap with apt when missing. podman
reads the test's own containers.conf (runc, `default_ulimits = []`). The base image is pulled from Docker Hub
where a registry answers, else made with debootstrap from Debian's packages; either way it is cached as a tarball
in .cache/container/ with this machine's own CA certificates (/usr/local/share/ca-certificates) added, so that
HTTPS works behind an egress proxy with its own CA. podman's layer cache keeps later builds short."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

pytestmark = pytest.mark.integration

CACHE = REPO_ROOT / ".cache" / "container"
BASE_TARBALL = CACHE / "debian-bookworm.tar"
REGISTRY_BASE = "docker.io/library/debian:bookworm-slim"
MIRROR = "http://deb.debian.org/debian"
BASE = "localhost/aiagentchat-test-base:bookworm"
IMAGE = "localhost/aiagentchat-test:latest"
STOCK = "localhost/aiagentchat-test-stock:bookworm"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a tarball has no image config
TOOLS = ("podman", "runc", "debootstrap")  # commands and Debian packages alike
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n'
# this machine's HTTPS goes through an egress proxy whose CA is in the system store: on stock Debian, pip, uv and
# npm are told to use that store (they bring their own otherwise; the image does this itself)
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"
CA_ENV = {"PIP_CERT": SYSTEM_CAS, "SSL_CERT_FILE": SYSTEM_CAS, "NODE_EXTRA_CA_CERTS": SYSTEM_CAS}
# stock Debian plus what the README's "Two commands" lists, and git to clone; `me` runs it
STOCK_CONTAINERFILE = f"""FROM {BASE}
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv nodejs npm bubblewrap git ca-certificates \\
 && rm -rf /var/lib/apt/lists/* \\
 && useradd --create-home me
"""
SLIM_DPKG = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
"""
SLIM_APT = """DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""
# podman's mounts over parts of /proc make the kernel refuse bwrap a fresh /proc for the agent (README: Container)
UNMASK = ("--security-opt", "unmask=/proc/*")
PULL_S = 60  # no answer from the registry by then: debootstrap
READY_S = 300  # the first start installs Synapse from PyPI into the volume
STOP_S = 15  # SIGTERM to exit: the daemon's 5 s, the built-in homeserver's 2 s, and slack


def podman_env() -> dict[str, str]:
    return os.environ | {"CONTAINERS_CONF": str(CACHE / "containers.conf")}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit code {result.returncode}\n{result.stderr[-3000:]}")
    return result


def env_args(env: dict[str, str]) -> list[str]:
    return [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]


def say(pytestconfig: pytest.Config, line: str) -> None:
    """A line in the test output as it happens, captured or not (image size, build time)."""
    pytestconfig.pluginmanager.get_plugin("terminalreporter").write_line(f"[container] {line}")


def ensure_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"{', '.join(missing)} missing and no apt-get to install them")
    quiet = {"stdout": subprocess.DEVNULL, "env": os.environ | {"DEBIAN_FRONTEND": "noninteractive"}}
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300, **quiet)
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    subprocess.run(install, check=True, timeout=900, **quiet)


def pulled(image: str) -> bool:
    try:
        return podman("pull", "-q", image, timeout=PULL_S, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def slim(root: Path) -> None:
    """Make a debootstrapped root like Docker Hub's debian:bookworm-slim: no documentation, manual pages or
    translations (now or from later packages), no package lists or downloaded packages kept."""
    (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG)
    (root / "etc/apt/apt.conf.d/docker-clean").write_text(SLIM_APT)
    docs = (root / "usr/share/doc").glob("*/*")  # a package's doc directory may be a link to another's
    unwanted = [path for path in docs if path.name != "copyright" and not path.parent.is_symlink()]
    for directory in ("usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists"):
        unwanted += (root / directory).glob("*")
    for path in unwanted:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in (root / "var/cache/apt/archives").glob("*.deb"):
        path.unlink()


def make_base_tarball(pytestconfig: pytest.Config) -> None:
    """Debian 12 as a root file system tarball, from Docker Hub when it answers, else debootstrapped, with this
    machine's CA certificates in /usr/local/share/ca-certificates (installing ca-certificates adds them)."""
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        if pulled(REGISTRY_BASE):
            root.mkdir()
            container = podman("create", REGISTRY_BASE, "true").stdout.strip()
            try:
                with subprocess.Popen(["podman", "export", container], env=podman_env(), stdout=subprocess.PIPE) as out:
                    subprocess.run(["tar", "-x", "-C", str(root)], stdin=out.stdout, check=True, timeout=300)
            finally:
                podman("rm", container)
            say(pytestconfig, f"base image: {REGISTRY_BASE}")
        else:
            started = time.monotonic()
            subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(root), MIRROR],
                check=True,
                timeout=1800,
                stdout=subprocess.DEVNULL,
            )
            slim(root)
            say(pytestconfig, f"base image: debootstrap bookworm from {MIRROR} in {time.monotonic() - started:.0f} s")
        local_cas = root / "usr/local/share/ca-certificates"
        local_cas.mkdir(parents=True, exist_ok=True)
        for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(cert, local_cas / cert.name)
        partial = Path(tmp) / "base.tar"
        subprocess.run(["tar", "-c", "-f", str(partial), "-C", str(root), "."], check=True)
        partial.replace(BASE_TARBALL)


@pytest.fixture(scope="module")
def image(pytestconfig: pytest.Config) -> str:
    """The image built from the Containerfile on the Debian 12 base, with its size and build time reported."""
    if os.geteuid() != 0:
        pytest.skip("builds and runs images with rootful podman and installs podman with apt: run as root (CI does)")
    ensure_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "containers.conf").write_text(CONTAINERS_CONF)
    if podman("image", "exists", BASE, check=False).returncode != 0:
        if not BASE_TARBALL.exists():
            make_base_tarball(pytestconfig)
        podman("import", "-q", "--change", f"ENV=PATH={PATH}", str(BASE_TARBALL), BASE, timeout=300)
    started = time.monotonic()
    podman(
        "build", "--format", "docker", "--network", "host", "--build-arg", f"BASE={BASE}", "-t", IMAGE, "-f", "Containerfile",
        str(REPO_ROOT), timeout=1800,
    )  # fmt: skip
    built = time.monotonic() - started
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    say(pytestconfig, f"image {IMAGE}: {size / 1e6:.0f} MB, built in {built:.0f} s (podman's layer cache included)")
    return IMAGE


class Running:
    """A foreground process (`podman run ...`), its stdout and stderr collected by threads as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, env=podman_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
        lines.extend(stream)  # line by line, as they come

    def out(self) -> str:
        return "".join(self.stdout)

    def describe(self) -> str:
        return f"exit code {self.proc.poll()}; stdout:\n{self.out()}\nstderr tail:\n{''.join(self.stderr[-40:])}"

    def wait_for(self, text: str, timeout: float) -> str:
        """Stdout once it holds `text` and the daemon has logged `ready` (it prints how to connect before its
        first sync, and a prompt sent before that is not run)."""
        deadline = time.monotonic() + timeout
        while text not in self.out() or not any('"event": "ready"' in line for line in self.stderr):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} on stdout within {timeout} s: {self.describe()}")
            time.sleep(0.2)
        return self.out()

    def exit_code(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    """The tests' scripted model server on the host's 127.0.0.1, which host networking shares."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.harness.model_server", "--port", "0"], cwd=REPO_ROOT, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("PORT "), f"model server did not start: {line!r}"
    yield f"http://127.0.0.1:{line.split()[1]}"
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def volume(image: str) -> Iterator[str]:
    name = f"aiagentchat-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "--force", name, check=False)


def stop(container: str, running: Running) -> int:
    """SIGTERM to the daemon (tini passes it on); its exit code, within STOP_S."""
    podman("kill", "--signal", "TERM", container)
    try:
        return running.exit_code(STOP_S)
    except subprocess.TimeoutExpired:
        running.kill()
        raise AssertionError(f"no exit within {STOP_S} s of SIGTERM: {running.describe()}") from None


def test_help(image: str) -> None:
    result = podman("run", "--rm", image, "--help")
    assert "Usage" in result.stdout, result.stdout + result.stderr


def test_image_has_no_node(image: str) -> None:
    found = podman("run", "--rm", "--entrypoint", "sh", image, "-c", "command -v node nodejs npm; exit 0").stdout
    assert found == "", f"Node.js in the final image: {found}"


def test_without_unmask_the_daemon_refuses_to_start_and_says_how(image: str) -> None:
    """podman's masks on /proc keep bwrap from giving an agent a fresh /proc: the start-up check finds it."""
    refused = podman("run", "--rm", "--network", "host", image, timeout=120, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "mount proc" in refused.stderr and "--security-opt 'unmask=/proc/*'" in refused.stderr, refused.stderr


def run_daemon(image: str, volume: str, model_url: str, name: str) -> Running:
    env = {"ANTHROPIC_BASE_URL": model_url, "ANTHROPIC_API_KEY": "sk-ant-test-not-a-real-key"}
    argv = ["podman", "run", "--rm", "--name", name, "--network", "host", *UNMASK, "-v", f"{volume}:/data"]
    return Running([*argv, *env_args(env), image])


def cchat(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return podman("exec", name, "cchat", *args, timeout=120, check=False)


def test_daemon_answers_through_cchat_keeps_its_volume_and_stops_cleanly(
    image: str, volume: str, model_url: str
) -> None:
    name = f"aiagentchat-test-{uuid.uuid4().hex[:8]}"
    running = run_daemon(image, volume, model_url, name)
    try:
        info = running.wait_for('cchat send local "say hello" --wait', READY_S)
        assert re.search(r"password:\s+\S+", info) and "password:   kept in" not in info, info
        answer = cchat(name, "send", "local", "say hello from the container", "--wait")
        assert answer.returncode == 0 and "hello from the container" in answer.stdout, (
            answer.stderr + running.describe()
        )
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, f"HEALTHCHECK: {health.stdout}{health.stderr}"
        assert stop(name, running) == 0, running.describe()
    finally:
        running.kill()
    again = run_daemon(image, volume, model_url, name)
    try:
        info = again.wait_for('cchat send local "say hello" --wait', 120)
        assert "password:   kept in /data/homeserver/accounts.json" in info, info
        answer = cchat(name, "send", "local", "recall", "--wait")
        assert answer.returncode == 0 and "say hello from the container" in answer.stdout, (
            answer.stderr + again.describe()
        )
        assert stop(name, again) == 0, again.describe()
    finally:
        again.kill()


def test_readme_run_command_on_stock_debian(image: str, tmp_path: Path) -> None:
    """`ANTHROPIC_API_KEY=... scripts/run` in a fresh clone, as an unprivileged user of stock Debian 12 with only
    the README's prerequisites: no uv, no pip into the system python. Downloads are cached in .cache/container.
    Unmasked /proc: a machine has none of podman's masks, which the daemon's bwrap check would refuse."""
    stock_file = tmp_path / "Containerfile"
    stock_file.write_text(STOCK_CONTAINERFILE)
    podman("build", "--network", "host", "-q", "-t", STOCK, "-f", str(stock_file), str(tmp_path), timeout=1200)
    clone = tmp_path / "aiagentchat"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    downloads = CACHE / "stock-downloads"  # npm's, pip's and uv's caches, kept between runs
    for tool in ("npm", "pip", "uv"):
        (downloads / tool).mkdir(parents=True, exist_ok=True)
    name = f"aiagentchat-test-stock-{uuid.uuid4().hex[:8]}"
    env = CA_ENV | {
        "ANTHROPIC_API_KEY": "sk-ant-test-not-a-real-key",
        "npm_config_cache": "/downloads/npm",
        "PIP_CACHE_DIR": "/downloads/pip",
        "UV_CACHE_DIR": "/downloads/uv",
    }
    running = Running(
        [
            "podman", "run", "--rm", "--name", name, "--network", "host", "--user", "me", *UNMASK,
            "-v", f"{clone}:/home/me/aiagentchat:U", "-v", f"{downloads}:/downloads:U", *env_args(env),
            STOCK, "sh", "-c", "cd ~/aiagentchat && exec scripts/run",
        ]
    )  # fmt: skip
    try:
        info = running.wait_for('scripts/cchat send local "say hello" --wait', READY_S)
        assert "homeserver: http://127.0.0.1:" in info, info
        assert stop(name, running) == 0, running.describe()
    finally:
        running.kill()
