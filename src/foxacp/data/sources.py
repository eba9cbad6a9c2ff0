"""Documents from files on disk, streamed.

A source is a text file (one document), a directory (recursive, sorted), a JSONL file (one
document per line, in field ``text``), or a Parquet file (column ``text``). ``.gz`` text and
JSONL files are read too.

What is text is decided by content, not by name: every text and JSONL file is sniffed (its first
8 KiB) and left out when it looks binary (a NUL byte, over 10% control bytes, or over 30% bytes
that are not UTF-8), whatever its extension. A directory walk takes JSONL/Parquet files, files
with a text extension (``TEXT_EXTENSIONS`` or the caller's ``extensions``) and, with the default
extensions, files without one (``README``, ``LICENSE``, ``Makefile``, scripts); files with other
extensions are left out and reported. Hidden files and folders and ``SKIP_DIRS`` are not walked.

Text is UTF-8 (a leading BOM dropped). Bytes that are not valid UTF-8 (Latin-1 / Windows-1252
text, or a stray byte) are decoded as Windows-1252 (the 5 bytes it leaves undefined as Latin-1),
never as U+FFFD, and the file is reported. Every file left out or re-decoded is recorded in a
:class:`SourceReport` with the reason.

Memory: a text file is read in 1 MiB blocks and handed on as a stream of pieces, so a file of
any size (one line or many) is never held whole; a JSONL line or Parquet record batch is.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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

SNIFF_BYTES = 8192  # how much of a file decides whether it is text
READ_BYTES = 1 << 20  # the block a text file is read in
# Bytes that plain text does not hold (all C0 controls but \b \t \n \v \f \r and ESC, plus DEL).
_CONTROL_BYTES = bytes(sorted(set(range(32)) - {8, 9, 10, 11, 12, 13, 27} | {127}))
# A byte that is not UTF-8, as Python's "surrogateescape" error handler leaves it: U+DC80..U+DCFF.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _cp1252_char(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81 0x8D 0x8F 0x90 0x9D: undefined in cp1252, Latin-1 controls
        return chr(byte)


_ESCAPED_TO_CP1252 = {0xDC00 + b: _cp1252_char(b) for b in range(0x80, 0x100)}
DECODED_CP1252 = "not UTF-8: decoded as Windows-1252 (Latin-1)"


class SourceError(ValueError):
    """An input file that cannot be read as what its name says (bad JSON, not Parquet, a failed read)."""


@dataclass
class SourceReport:
    """The files left out of a data set (``skipped``) or decoded differently (``notes``), with reasons."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path: str | os.PathLike, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def note(self, path: str | os.PathLike, message: str) -> None:
        self.notes.append((str(path), message))

    def __bool__(self) -> bool:
        return bool(self.skipped or self.notes)

    def lines(self, max_names: int = 10) -> list[str]:
        """A summary, one line per reason: how many files, and the first ``max_names`` names."""
        out = []
        for verb, entries in (("skipped", self.skipped), ("decoded", self.notes)):
            if entries:
                out.append(f"{verb} {len(entries)} file{'s' if len(entries) > 1 else ''}:")
            for reason, paths in _group(entries).items():
                more = f", and {len(paths) - max_names} more" if len(paths) > max_names else ""
                out.append(f"  {reason}: {len(paths)}: {', '.join(paths[:max_names])}{more}")
        return out

    def summary(self, max_names: int = 10) -> str:
        """:meth:`lines` as printed to stderr, each heading marked ``foxacp data:``."""
        return "\n".join(line if line.startswith(" ") else f"foxacp data: {line}" for line in self.lines(max_names))

    def to_json(self, max_entries: int = 1000) -> dict:
        """For the store's manifest: the first ``max_entries`` of each list, and the counts."""
        return {"n_skipped": len(self.skipped), "skipped": [list(e) for e in self.skipped[:max_entries]],
                "n_notes": len(self.notes), "notes": [list(e) for e in self.notes[:max_entries]]}


def _group(entries: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for path, reason in entries:
        grouped.setdefault(reason, []).append(path)
    return grouped


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kind: str  # "text" | "jsonl" | "parquet"

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _kind(path: Path) -> str | None:
    """"jsonl"/"parquet" by extension, "text" for a text extension, None otherwise."""
    name = path.name.lower()
    if name.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if name.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    return "text" if _text_suffix(path) in TEXT_EXTENSIONS else None


def _text_suffix(path: Path) -> str:
    """The extension, looking through ``.gz``: ``a.txt.gz`` -> ``.txt``; ``README`` -> ``""``."""
    name = path.name.lower()
    return Path(name[:-3]).suffix if name.endswith(".gz") else Path(name).suffix


def _walk_kind(path: Path, text_ext: frozenset[str] | None) -> tuple[str | None, str]:
    """How a directory walk takes ``path``: ``(kind, "")``, or ``(None, why it is left out)``.

    ``text_ext`` None: the default extensions plus files without one; else exactly those.
    """
    kind = _kind(path)
    if kind in ("jsonl", "parquet"):
        return kind, ""
    suffix = _text_suffix(path)
    if text_ext is None:
        if kind == "text" or suffix == "":
            return "text", ""
        return None, "extension not a text extension (choose extensions with --ext / extensions=)"
    if suffix in text_ext:
        return "text", ""
    return None, "extension not among those chosen (--ext / extensions=)"


def expand_sources(sources: Iterable[str | os.PathLike], *, extensions: Iterable[str] | None = None,
                   report: SourceReport | None = None) -> list[SourceFile]:
    """Resolve paths to files in a deterministic order (arguments in order, directories sorted).

    A file named explicitly is read as JSONL/Parquet by its extension and as text otherwise; a
    directory contributes the files described in the module docstring (``extensions`` replaces
    the text extensions). Files a walk leaves out are added to ``report``.
    """
    text_ext = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions) \
        if extensions else None
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
                    if name.startswith(".") or not p.is_file():
                        continue
                    kind, why = _walk_kind(p, text_ext)
                    if kind is not None:
                        files.append(SourceFile(p, kind))
                    elif report is not None:
                        report.skip(p, why)
        elif path.exists():
            raise SourceError(f"{src}: not a regular file or a directory")
        else:
            raise FileNotFoundError(f"no such file or directory: {src}")
    return files


def not_text_reason(sample: bytes) -> str | None:
    """Why the start of a file (``sample``) is not text, or None when it is."""
    if b"\x00" in sample:
        return "binary (NUL bytes)"
    if not sample:
        return None
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if controls > 0.1 * len(sample):
        return "binary (control bytes)"
    invalid = len(_ESCAPED_BYTE.findall(sample.decode("utf-8", "surrogateescape")))
    if invalid - 3 > 0.3 * len(sample):  # 3: a character cut at the end of the sample
        return "not text (mostly bytes that are not UTF-8)"
    return None


def decode_escaped(text: str) -> tuple[str, int]:
    """``text`` decoded with ``surrogateescape``, its escaped (non-UTF-8) bytes as cp1252; and how many."""
    n = len(_ESCAPED_BYTE.findall(text))
    return (text.translate(_ESCAPED_TO_CP1252) if n else text), n


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _is_text(path: Path, report: SourceReport) -> bool:
    """Sniff the start of ``path``: False, with the reason added to ``report``, when it is not text."""
    try:
        with _open_binary(path) as f:
            sample = f.read(SNIFF_BYTES)
    except (OSError, EOFError) as err:  # no permission, not gzip, ...
        report.skip(path, f"unreadable ({err})")
        return False
    reason = not_text_reason(sample)
    if reason:
        report.skip(path, reason)
    return reason is None


def _read_failed(path: Path, done: int, err: Exception) -> SourceError:
    return SourceError(f"{path}: reading failed after {done} bytes ({err})")


def _text_blocks(path: Path, report: SourceReport) -> Iterator[str]:
    """The text of ``path`` in blocks of about ``READ_BYTES`` (see the module docstring for the
    decoding). Adds ``path`` to ``report`` when it held bytes that are not UTF-8, or only whitespace."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
    invalid, has_text, done = 0, False, 0
    with _open_binary(path) as f:
        while True:
            try:
                block = f.read(READ_BYTES)
            except (OSError, EOFError) as err:  # e.g. a truncated .gz
                raise _read_failed(path, done, err) from None
            text, n = decode_escaped(decoder.decode(block, final=not block))
            invalid += n
            has_text = has_text or (bool(text) and not text.isspace())
            done += len(block)
            yield text
            if not block:
                break
    if invalid:
        report.note(path, DECODED_CP1252)
    if not has_text:
        report.skip(path, "empty or only whitespace")


def _text_file(source: SourceFile, report: SourceReport) -> Iterator[tuple[str | Iterator[str], int]]:
    """The file as one document, a stream of text blocks ("" when it is left out: its size still
    counts as consumed, for the progress bar)."""
    yield (_text_blocks(source.path, report) if _is_text(source.path, report) else ""), source.size


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """``(line number, line, bytes of the file on disk consumed)`` of a JSONL file (gzip or not)."""
    done = 0
    with open(path, "rb") as raw:
        lines = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        try:
            for lineno, line in enumerate(lines, 1):
                position = raw.tell()  # of the file on disk (compressed or not): for progress
                yield lineno, line, position - done
                done = position
        except (OSError, EOFError) as err:  # e.g. a truncated .gz
            raise _read_failed(path, done, err) from None


def _jsonl_file(source: SourceFile, text_field: str, report: SourceReport) -> Iterator[tuple[str, int]]:
    path = source.path
    if not _is_text(path, report):
        yield "", source.size
        return
    invalid = 0
    for lineno, raw_line, consumed in _jsonl_lines(path):
        line, n = decode_escaped(raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8", "surrogateescape"))
        invalid += n
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{path}:{lineno}: not valid JSON ({err})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise SourceError(f"{path}:{lineno}: no string field {text_field!r}")
        yield text, consumed
    if invalid:
        report.note(path, DECODED_CP1252)


def _parquet_file(source: SourceFile, text_field: str) -> Iterator[tuple[str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = source.path
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise SourceError(f"{path}: not a readable Parquet file ({err})") from None
    if text_field not in pf.schema_arrow.names:
        raise SourceError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
    n_groups = max(pf.num_row_groups, 1)
    per_group = source.size // n_groups
    for g in range(pf.num_row_groups):
        texts = pf.read_row_group(g, columns=[text_field]).column(text_field).to_pylist()
        for i, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                raise SourceError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings")
            yield (text or ""), (per_group if i == len(texts) - 1 else 0)


def iter_file(source: SourceFile, *, text_field: str = "text",
              report: SourceReport | None = None) -> Iterator[tuple[str | Iterator[str], int]]:
    """``(document, bytes of the file consumed)`` pairs; the byte counts sum to about the file size.

    A document is a ``str``, or for a text file an iterator of ``str`` blocks (consume it before
    asking for the next document). Files left out or re-decoded are added to ``report``.
    """
    report = SourceReport() if report is None else report
    if source.kind == "text":
        return _text_file(source, report)
    if source.kind == "jsonl":
        return _jsonl_file(source, text_field, report)
    if source.kind == "parquet":
        return _parquet_file(source, text_field)
    raise ValueError(f"unknown source kind {source.kind!r}")  # pragma: no cover


def iter_documents(files: Iterable[SourceFile], *, text_field: str = "text",
                   report: SourceReport | None = None) -> Iterator[tuple[str | Iterator[str], int]]:
    """All documents of ``files`` in order, as ``(document, bytes consumed)`` (see :func:`iter_file`)."""
    for source in files:
        yield from iter_file(source, text_field=text_field, report=report)


def iter_texts(sources: Iterable[str | os.PathLike], *, text_field: str = "text",
               report: SourceReport | None = None) -> Iterator[str]:
    """The text of ``sources`` (paths), e.g. to train a tokenizer: each JSONL/Parquet record, and
    each text file in blocks of about 1 MiB (never a whole large file at once)."""
    report = SourceReport() if report is None else report
    for document, _ in iter_documents(expand_sources(sources, report=report), text_field=text_field, report=report):
        for text in ((document,) if isinstance(document, str) else document):
            if text:
                yield text
