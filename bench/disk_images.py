"""Test disk images for the benchmarks: the mix the issues ask for, and scattered changes."""

import random
from pathlib import Path

MIB = 1024 * 1024
BLOCK = 2 * MIB
PAGE = 4096


def make_raw(path: Path, size: int) -> None:
    """A raw image of 2 MiB blocks: 40% random, 30% zeros, 30% text (deterministic)."""
    rnd = random.Random(1)
    phrase = b"ReClo keeps the office running when its server does not. "
    text = (phrase * (BLOCK // len(phrase) + 1))[:BLOCK]
    with open(path, "wb") as f:
        for _ in range(size // BLOCK):
            kind = rnd.random()
            if kind < 0.4:
                f.write(rnd.randbytes(BLOCK))
            elif kind < 0.7:
                f.write(bytes(BLOCK))
            else:
                f.write(text)


def change_pages(path: Path, fraction: float, seed: int) -> dict[int, list[tuple[int, int]]]:
    """Rewrite ``fraction`` of the 4 KiB pages in place; return the changed sector runs per block."""
    rnd = random.Random(seed)
    size = path.stat().st_size
    runs: dict[int, list[tuple[int, int]]] = {}
    with open(path, "r+b") as f:
        for page in sorted(rnd.sample(range(size // PAGE), int(size // PAGE * fraction))):
            f.seek(page * PAGE)
            f.write(rnd.randbytes(PAGE))
            index, within = divmod(page * PAGE, BLOCK)
            runs.setdefault(index, []).append((within // 512, PAGE // 512))
    return runs
