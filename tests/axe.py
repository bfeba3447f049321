"""axe-core, the accessibility checker, fetched from the npm registry once and cached.

Pinned: a new axe release adds rules, and a page must not fail because of an
upgrade nobody chose. The package is fetched with the machine's own npm
(`npm pack`, which checks the registry's integrity hash) into
~/.cache/reclo/axe/<version>/ (RECLO_AXE_CACHE overrides it), never into
the repository; .ci/run fetches it before the tests, like the boot disks.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

AXE_VERSION = "4.10.3"
# The tarball's SHA-256 as the registry served it when the pin was chosen.
AXE_SHA256 = "0f2b4d7dcdf7d1219df8d1959ad68e565f51d14c3f0d88bb71cd59abeb956292"
SERIOUS = ("serious", "critical")


def cache_dir() -> Path:
    return Path(os.environ.get("RECLO_AXE_CACHE") or Path.home() / ".cache" / "reclo" / "axe") / AXE_VERSION


def fetch() -> Path:
    """The path of axe.min.js, fetching it with `npm pack` when it is not cached yet."""
    target = cache_dir() / "axe.min.js"
    if target.exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not installed (it comes with Node.js)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reclo-axe-") as tmp:
        subprocess.run(
            [npm, "pack", f"axe-core@{AXE_VERSION}", "--pack-destination", tmp, "--silent"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        tarball = Path(tmp) / f"axe-core-{AXE_VERSION}.tgz"
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != AXE_SHA256:
            raise RuntimeError(f"axe-core {AXE_VERSION} has SHA-256 {digest}, expected {AXE_SHA256}")
        with tarfile.open(tarball) as archive:
            source = archive.extractfile("package/axe.min.js").read()
        partial = target.with_suffix(".part")
        partial.write_bytes(source)
        partial.rename(target)  # whole or not at all: parallel test runs may fetch at once
    return target


def violations(page, axe_source: str) -> list[dict]:
    """axe's serious and critical violations on the page as it is now (WCAG 2 A and AA, and best practice)."""
    # Evaluated through the DevTools protocol, so the page's CSP (no inline
    # scripts) does not apply to it.
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(axe_source)
    found = page.evaluate(
        """async () => {
            const result = await window.axe.run(document, {resultTypes: ["violations"]});
            return result.violations.map(v => ({
                id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.slice(0, 5).map(n => n.target.join(" ") + " :: " + (n.failureSummary || "")),
            }));
        }"""
    )
    return [v for v in found if v["impact"] in SERIOUS]


if __name__ == "__main__":  # .ci/run: python -m tests.axe
    print(fetch())
    sys.exit(0)
