"""Hugging Face tokenizer files for an exported model, so ``AutoTokenizer`` loads its folder.

:func:`hf_tokenizer` wraps a foxacp tokenizer (``"gpt2"``, ``"bytes"`` or a ``tokenizers`` JSON,
see :mod:`foxacp.data.tokenizer`) as a ``PreTrainedTokenizerFast`` that gives the same ids and
prepends BOS to every text, as the FoX paper's evaluation does (``add_bos_token=True``: a
document's first token is predicted from BOS, as in training, where documents follow an EOT).
BOS, EOS, UNK and PAD are the tokenizer's EOT token (``<|endoftext|>`` for GPT-2; PAD so that
batches can be padded, the attention mask hides it), and
``model_max_length`` is the training context. One difference from training: training encodes a
literal ``<|endoftext|>`` inside a text as plain text, the Hugging Face tokenizer (as GPT-2's)
as the special token.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenizer import EOT_TOKEN, HFTokenizer, get_tokenizer


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte 0..255.

    Printable Latin-1 bytes stand for themselves; the others map, in order, to 256, 257, ...
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _bytes_backend():
    """A ``tokenizers.Tokenizer`` with foxacp's ``bytes`` ids: byte b -> id b, EOT -> 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT_TOKEN])
    return tok


def hf_tokenizer(name: str, *, model_max_length: int):
    """``PreTrainedTokenizerFast`` for the foxacp tokenizer ``name``, prepending BOS (see module doc)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = get_tokenizer(name)
    if isinstance(tokenizer, HFTokenizer):
        backend = _copy(tokenizer.backend)
    else:
        backend = _bytes_backend()
    eot_id = tokenizer.eot_id
    eot = backend.id_to_token(eot_id)
    if eot is None:
        raise ValueError(f"tokenizer {name!r}: its EOT id {eot_id} has no token")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{eot} $A", pair=f"{eot} $A {eot} $B", special_tokens=[(eot, eot_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot,
                                   model_max_length=model_max_length, add_bos_token=True,
                                   clean_up_tokenization_spaces=False)


def _copy(backend):
    """An independent copy of a ``tokenizers.Tokenizer`` (the cached one stays as it is)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(backend.to_str())


def save_hf_tokenizer(name: str, out: str | Path, *, model_max_length: int) -> None:
    """Write the tokenizer files of :func:`hf_tokenizer` into ``out`` (``tokenizer.json`` and
    ``tokenizer_config.json``), loadable by ``AutoTokenizer`` of transformers 4 and 5."""
    hf_tokenizer(name, model_max_length=model_max_length).save_pretrained(str(out))
    # transformers 5 records its own class name (TokenizersBackend), which version 4 does not know.
    path = Path(out) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")
