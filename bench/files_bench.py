"""The file browser's reads from a restore point in the emulator: list 10,000 files, download 100 MiB.

Builds (once, cached beside the test images) an ext4 file system in a GPT
table holding ``/many`` (10,000 small files) and ``/big.bin`` (100 MiB of
random bytes), stores it as a restore point (a dynamic VHD as seekable zstd)
in moto's S3 server on a loopback port, and times what the worker does for
a browse and a download: STS credentials for the one object, the chain
reader over ranged GETs with its block cache, the confined parser child.
Baselines measured in the same run: the same parser over the raw image on
local disk (no storage, no VHD), and one plain GET of the whole object.
The web process's hop through the cache is not in these figures.

    .venv/bin/python bench/files_bench.py
"""

import hashlib
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 1024 * 1024
FILES = 10_000


def build_image(folder: Path) -> Path:
    """The raw GPT disk with one ext4 partition (cached)."""
    image = folder / "bench-ext4.img"
    if image.exists():
        return image
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reclo-files-bench-") as tmp:
        tree = Path(tmp) / "tree"
        (tree / "many").mkdir(parents=True)
        for n in range(FILES):
            (tree / "many" / f"file-{n:05}.txt").write_bytes(b"x" * (n % 200))
        (tree / "big.bin").write_bytes(random.Random(1).randbytes(100 * MIB))
        part = Path(tmp) / "part.img"
        subprocess.run(["truncate", "-s", "180M", str(part)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(part)], check=True)
        from reclo_site.testing_fsimages import _disk

        _disk(Path(tmp) / "disk.img", "gpt", [(part, "linux")])
        os.replace(Path(tmp) / "disk.img", image)
    return image


class LocalDisk:
    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - lives as long as the bench
        self.size = path.stat().st_size

    def read(self, offset: int, length: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(length)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    from moto.server import ThreadedMotoServer

    from reclo_site.testing import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "DJANGO_SETTINGS_MODULE": "reclo_site.settings",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})  # fmt: skip
    os.environ.setdefault("RECLO_VAR_DIR", tempfile.mkdtemp(prefix="reclo-files-bench-var-"))
    import django

    django.setup()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    from reclo_agent import vhd

    from backups.services import files
    from backups.services.downloads import read_policy
    from reclo_site.cloud import credentials, storage
    from reclo_site.testing_fsimages import cache_root

    try:
        image = build_image(cache_root())
        storage.ensure_bucket()
        out = io.BytesIO()
        with image.open("rb") as raw, vhd.SeekableZstdWriter(out) as writer:
            vhd.write_dynamic_from_raw(raw, writer)
        key = "backups/1/bench/sda/00000000-0000-4000-8000-000000000001.vhd.zst"
        stored = storage.put_object(key, out.getvalue())
        point = SimpleNamespace(key=key, pinned={"version_id": stored["version_id"] or None, "etag": stored["etag"]})
        want = hashlib.sha256(random.Random(1).randbytes(100 * MIB)).hexdigest()

        def over_storage():
            creds = credentials.issue(policy=read_policy(1, [key]), session_name="reclo-files-bench")
            return files.open_chain_reader([point], creds)

        def listing(disk):
            heads = []
            files.sandbox_run(disk, {"op": "list", "partition": 1, "path": "/many"}, on_head=heads.append)
            assert len(heads[0]["entries"]) == FILES, len(heads[0]["entries"])

        def download(disk):
            digest = hashlib.sha256()
            files.sandbox_run(disk, {"op": "read", "partition": 1, "path": "/big.bin"}, on_head=lambda h: None,
                              on_data=digest.update, cpu=600, wall=600)  # fmt: skip
            assert digest.hexdigest() == want

        def plain_get():
            with storage.ObjectReader(key, **point.pinned, chunk_size=64 * MIB) as reader:
                while reader.read(64 * MIB):
                    pass

        print(f"restore point: {image.stat().st_size / MIB:.0f} MiB disk, {len(out.getvalue()) / MIB:.0f} MiB stored")
        print(f"{'what':<58} {'seconds':>8}")
        rows = [
            ("list /many (10,000 files), restore point in moto S3", lambda: listing(over_storage())),
            ("  baseline: the same parser over the raw image on disk", lambda: listing(LocalDisk(image))),
            ("download /big.bin (100 MiB), restore point in moto S3", lambda: download(over_storage())),
            ("  baseline: the same parser over the raw image on disk", lambda: download(LocalDisk(image))),
            ("  baseline: one plain GET of the whole stored object", plain_get),
        ]
        for label, fn in rows:
            seconds, _ = timed(fn)
            print(f"{label:<58} {seconds:8.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
