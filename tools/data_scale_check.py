"""The data cache at scale: a folder of 50,000 PNGs decoded once, opened in seconds after.

    python tools/data_scale_check.py ROOT [--counts 5000 50000] [--steps 20]

Writes ROOT/images-50000/ (toy cars at 128x128 as PNG files in body-type folders, with 3
files among them that are not images; smaller counts are hard links to its first files),
then for each count runs, from the source tree,

    ddpm-cars train --preset demo --data ROOT/images-N --image-size 64 --steps 20 --out ROOT/run-N-K

twice, with the data cache in ROOT/cache (emptied first): the first run decodes the folder
into the cache and prints its decode rate, the second opens the cache. For each run it
prints the seconds from the process's start to the training bar (the first step follows at
once) and the peak resident memory (os.wait4), as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

CHUNK = 1000
BROKEN = 3


def _write_chunk(root: Path, start: int, size: int) -> None:
    from PIL import Image

    from ddpm_cars.data.toy_cars import BODY_TYPES, generate_toy_cars

    images, labels = generate_toy_cars(CHUNK, size, seed=start // CHUNK)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / BODY_TYPES[label] / f"{start + i:06d}.png"
        Image.fromarray(image.transpose(1, 2, 0)).save(path)


def write_folder(root: Path, count: int, size: int = 128) -> Path:
    """``count`` toy-car PNGs (a multiple of 1,000) and ``BROKEN`` files that are not images."""
    from ddpm_cars.data.toy_cars import BODY_TYPES

    folder = root / f"images-{count}"
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for name in BODY_TYPES:
        (folder / name).mkdir(parents=True)
    tic = time.perf_counter()
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_chunk, [folder] * (count // CHUNK), range(0, count, CHUNK), [size] * (count // CHUNK)))
    for i in range(BROKEN):
        (folder / BODY_TYPES[i] / f"broken-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    (folder / "done").write_text("")
    print(f"wrote {count} PNGs at {size}x{size} in {time.perf_counter() - tic:.0f} s: {folder}", flush=True)
    return folder


def subset(big: Path, root: Path, count: int) -> Path:
    """The first ``count`` images of ``big`` (by file name), as hard links, with the broken files."""
    folder = root / f"images-{count}"
    shutil.rmtree(folder, ignore_errors=True)
    images = sorted((p for p in big.rglob("*.png") if not p.name.startswith("broken")), key=lambda p: p.name)
    for path in images[:count] + sorted(big.rglob("broken-*.png")):
        target = folder / path.relative_to(big)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    return folder


def train_once(folder: Path, out: Path, cache: Path, steps: int) -> dict[str, float | str]:
    """One training run: seconds to the training bar, peak RSS, and the cache's decode line."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "ddpm_cars",
        "train",
        "--preset",
        "demo",
        "--data",
        str(folder),
        "--image-size",
        "64",
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--data-cache",
        str(cache),
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    tic = time.perf_counter()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True, bufsize=1)
    to_bar, decode_line, buffer = None, "", ""
    while chunk := proc.stderr.read(1):
        buffer += chunk
        if to_bar is None and "Training:" in buffer:
            to_bar = time.perf_counter() - tic
        if chunk in "\n\r":
            if buffer.startswith("Decoded "):
                decode_line = buffer.strip()
            buffer = ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    return {
        "to_first_step_s": to_bar or float("nan"),
        "total_s": time.perf_counter() - tic,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "decode": decode_line,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="where the folders, the cache and the runs go")
    parser.add_argument(
        "--counts", type=int, nargs="+", default=[5000, 50000], help="folder sizes (multiples of 1,000)"
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    args = parser.parse_args()
    biggest = write_folder(args.root, max(args.counts))
    rows = []
    for count in sorted(args.counts):
        folder = biggest if count == max(args.counts) else subset(biggest, args.root, count)
        cache = args.root / f"cache-{count}"
        shutil.rmtree(cache, ignore_errors=True)
        for attempt in ("first (decodes)", "second (cache)"):
            result = train_once(folder, args.root / f"run-{count}", cache, args.steps)
            rows.append((count, attempt, result))
            print(count, attempt, result, flush=True)
    print("\n| images | run | to the first step | peak RSS | whole run |\n| ---: | --- | ---: | ---: | ---: |")
    for count, attempt, r in rows:
        print(
            f"| {count:,} | {attempt} | {r['to_first_step_s']:.1f} s | {r['peak_rss_mb']:.0f} MB | {r['total_s']:.0f} "
            "s |"
        )
    for count, attempt, r in rows:
        if r["decode"]:
            print(f"{count:,}: {r['decode']}")


if __name__ == "__main__":
    main()
