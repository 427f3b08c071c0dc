"""Fetch the pinned Claude Code CLI for this machine, glibc Linux, as one file: the native binary of the platform
package that package-lock.json pins (name, version, and the integrity hash the download must match), from the npm
registry (`NPM_CONFIG_REGISTRY`, default registry.npmjs.org). The Containerfile's build stage runs it
(`python3 scripts/lib/fetch_claude.py /claude`) so that no Node.js is needed: `npm ci` would also fetch the musl
build (Debian's npm 9 ignores the lock file's `libc` field) and the wrapper package, whose install script only
copies this same binary into place."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ARCHES = {"x86_64": "x64", "aarch64": "arm64"}
CHUNK = 1 << 20


def main() -> None:
    dest = Path(sys.argv[1])
    arch = ARCHES.get(platform.machine())
    if arch is None:
        sys.exit(f"no Claude Code CLI build for {platform.machine()}")
    name = f"@anthropic-ai/claude-code-linux-{arch}"
    pinned = json.loads(Path("package-lock.json").read_text())["packages"][f"node_modules/{name}"]
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{name}/-/{name.split('/')[1]}-{pinned['version']}.tgz"
    algorithm, expected = pinned["integrity"].split("-", 1)
    digest = hashlib.new(algorithm)
    with tempfile.TemporaryFile() as tarball:
        with urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                tarball.write(chunk)
        if base64.b64encode(digest.digest()).decode() != expected:
            sys.exit(f"{url}: not the integrity hash of package-lock.json")
        tarball.seek(0)
        with tarfile.open(fileobj=tarball) as archive, dest.open("wb") as out:
            shutil.copyfileobj(archive.extractfile("package/claude"), out)
    dest.chmod(0o755)


if __name__ == "__main__":
    main()
