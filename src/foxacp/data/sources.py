"""Documents from files on disk, streamed one at a time.

A source is a text file (one document), a directory (recursive, sorted, text-like extensions),
a JSONL file (one document per line, in field ``text``), or a Parquet file (column ``text``).
``.gz`` text and JSONL files are read too. Nothing is held beyond the current document (JSONL
line, Parquet record batch).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Extensions a directory walk picks up as plain-text documents.
TEXT_EXTENSIONS = frozenset({
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu",
    ".rs", ".go", ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html",
    ".css", ".csv", ".tsv", ".org",
})
JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", "node_modules", ".venv", ".tox"})


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kind: str  # "text" | "jsonl" | "parquet"

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if name.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    suffix = Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()
    if suffix in TEXT_EXTENSIONS:
        return "text"
    return None


def expand_sources(sources: Iterable[str | os.PathLike], *, extensions: Iterable[str] | None = None) -> list[SourceFile]:
    """Resolve paths to files in a deterministic order (arguments in order, directories sorted).

    A file named explicitly is read as JSONL/Parquet by its extension and as text otherwise; a
    directory contributes files with known extensions (``extensions`` narrows the text ones).
    """
    text_ext = frozenset(e if e.startswith(".") else "." + e for e in extensions) if extensions else TEXT_EXTENSIONS
    files: list[SourceFile] = []
    for src in sources:
        path = Path(src)
        if path.is_file():
            files.append(SourceFile(path, _kind(path) or "text"))
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
                for name in sorted(names):
                    p = Path(root) / name
                    kind = _kind(p)
                    if kind == "text" and p.suffix.lower() not in text_ext and not name.endswith(".gz"):
                        kind = None
                    if kind is not None and p.is_file():
                        files.append(SourceFile(p, kind))
        else:
            raise FileNotFoundError(f"no such file or directory: {src}")
    return files


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def iter_file(source: SourceFile, *, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """``(document, bytes of the file consumed)`` pairs; the byte counts sum to about the file size."""
    path = source.path
    if source.kind == "text":
        with _open_binary(path) as f:
            data = f.read()
        yield data.decode("utf-8", errors="replace"), source.size
    elif source.kind == "jsonl":
        with open(path, "rb") as raw:
            lines = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
            done = 0
            for lineno, line in enumerate(lines, 1):
                position = raw.tell()  # of the file on disk (compressed or not): for progress
                consumed, done = position - done, position
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: no string field {text_field!r}")
                yield text, consumed
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
        n_groups = max(pf.num_row_groups, 1)
        per_group = source.size // n_groups
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=[text_field])
            texts = table.column(text_field).to_pylist()
            for i, text in enumerate(texts):
                yield (text or ""), (per_group if i == len(texts) - 1 else 0)
    else:  # pragma: no cover
        raise ValueError(f"unknown source kind {source.kind!r}")


def iter_documents(files: Iterable[SourceFile], *, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """All documents of ``files`` in order, as ``(text, bytes consumed)``."""
    for source in files:
        yield from iter_file(source, text_field=text_field)


def iter_texts(sources: Iterable[str | os.PathLike], *, text_field: str = "text") -> Iterator[str]:
    """Just the documents of ``sources`` (paths), e.g. to train a tokenizer."""
    for text, _ in iter_documents(expand_sources(sources), text_field=text_field):
        if text:
            yield text
