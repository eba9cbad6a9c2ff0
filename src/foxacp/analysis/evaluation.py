"""Held-out evaluation behind ``foxacp eval``: loss with ACP on/off, loss by position, needle
retrieval and inference throughput. Everything works on any causal LM loaded through Hugging
Face (``model(input_ids).logits``, ``generate()``); FoX models also get the ACP-on/off pairs.

- :func:`per_token_losses`: cross-entropy per target token ``(N, L)`` (float64 on CPU).
- :func:`acp_parity`: the same tokens with ACP on and off; both losses, perplexities and the
  largest per-token loss difference.
- :func:`position_curve`: mean loss per position over the windows, moving-average smoothed.
- :func:`make_needle_prompt` / :func:`needle_grid`: a key-value sentence "The secret number of
  NAME is NNNN." inserted at depth ``d`` of ``L`` tokens of held-out text; the question at the
  end; exact match of the greedy answer's leading digits.
- :func:`throughput`: prefill tokens/s (one forward over the prompt) and decode tokens/s (one
  token per step from the cache), timed after a warm-up, with the cache's memory; for FoX models
  with QK-norm also through the ACP eviction cache (:func:`can_evict`).
- :func:`run_eval`: all of the above for a list of loaded models (what ``foxacp eval`` runs);
  :func:`foxacp.analysis.outputs.write_eval` writes its result as a report folder.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models.modeling import CACHE_NAME  # the cache keyword of the installed transformers (4.x / 5.x)

NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kavya",
         "Liam", "Marta", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Stefan", "Tomas", "Ulla", "Viktor",
         "Wanda", "Yusuf", "Zofia")


# ---- loss ------------------------------------------------------------------------------------
@torch.no_grad()
def per_token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, *, device, chunk: int = 1024) -> torch.Tensor:
    """Per-token cross-entropy ``(N, L)`` float64 (NaN where the label is -100), one row at a time.

    FoX models skip the full ``(L, V)`` logits: hidden states go through the LM head in chunks.
    Other models use ``model(input_ids).logits``.
    """
    rows = []
    for ids, lab in zip(input_ids, labels):
        ids, lab = ids[None].to(device), lab.to(device)
        if hasattr(model, "model") and hasattr(model, "lm_head") and hasattr(model.config, "padded_vocab_size"):
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
            parts = []
            for s in range(0, hidden.shape[0], chunk):
                logits = model.lm_head(hidden[s:s + chunk])[..., :model.config.vocab_size].float()
                parts.append(F.cross_entropy(logits, lab[s:s + chunk].clamp_min(0), reduction="none"))
            loss = torch.cat(parts)
        else:
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            loss = F.cross_entropy(logits, lab.clamp_min(0), reduction="none")
        loss = loss.double().masked_fill(lab < 0, float("nan"))
        rows.append(loss.cpu())
    return torch.stack(rows)


def loss_summary(losses: torch.Tensor) -> dict:
    mean = float(np.nanmean(losses.numpy()))
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": int((~torch.isnan(losses)).sum())}


def acp_parity(on: torch.Tensor, off: torch.Tensor, log_eps: float) -> dict:
    """Compare per-token losses of the same tokens with ACP on and off."""
    diff = (on - off).abs()
    return {"loss_acp_on": loss_summary(on)["loss"], "loss_acp_off": loss_summary(off)["loss"],
            "perplexity_acp_on": loss_summary(on)["perplexity"], "perplexity_acp_off": loss_summary(off)["perplexity"],
            "mean_loss_difference": float(np.nanmean((on - off).numpy())),
            "max_abs_token_loss_difference": float(np.nanmax(diff.numpy())),
            "eps": math.exp(log_eps),
            "note": "ACP removes at most eps of each query's attention mass per layer; the output of a "
                    "layer moves by at most 2 eps max|v| elementwise"}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first ``window - 1`` points average what exists so far)."""
    window = max(1, int(window))
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def position_curve(losses: torch.Tensor, window: int, max_points: int = 2000) -> dict:
    """Mean loss per position (over windows), smoothed; subsampled to ``max_points`` for the JSON."""
    mean = np.nanmean(losses.numpy(), axis=0)
    mean = np.where(np.isnan(mean), np.nanmean(mean), mean)
    smooth = moving_average(mean, window)
    step = max(1, len(mean) // max_points)
    pos = np.arange(len(mean))[::step]
    return {"positions": pos.tolist(), "mean": mean[::step].tolist(), "smoothed": smooth[::step].tolist(),
            "window": int(window), "first_quarter_loss": float(mean[: len(mean) // 4].mean()),
            "last_quarter_loss": float(mean[-(len(mean) // 4):].mean())}


# ---- needle in a haystack --------------------------------------------------------------------
@dataclass
class NeedlePrompt:
    input_ids: list[int]  # BOS + haystack with the needle + question
    answer: str  # the number, as text
    name: str
    needle_ids: list[int]
    needle_start: int  # index in input_ids where needle_ids begin
    depth: float  # requested depth (fraction of the haystack before the needle)


def make_needle_prompt(tokenizer, haystack_ids, length: int, depth: float, rng: random.Random,
                       bos_id: int | None = None) -> NeedlePrompt:
    """A prompt of exactly ``length`` tokens: ``[BOS] haystack[:p] needle haystack[p:] question``.

    ``haystack_ids``: held-out tokens (at least ``length`` of them). ``p = round(depth * n)``
    with ``n`` the haystack tokens that fit, so depth 0 puts the needle right after BOS and
    depth 1 right before the question.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    name = rng.choice(NAMES)
    number = str(rng.randint(1000, 9999))
    needle = tokenizer.encode(f" The secret number of {name} is {number}. ")
    question = tokenizer.encode(f" What is the secret number of {name}? The secret number of {name} is")
    head = [tokenizer.bos_id if bos_id is None else bos_id]
    n = length - len(head) - len(needle) - len(question)
    if n < 0:
        raise ValueError(f"length {length} is too short for the needle and question ({length - n} tokens)")
    hay = [int(t) for t in haystack_ids[:n]]
    if len(hay) < n:
        raise ValueError(f"haystack has {len(hay)} tokens, {n} needed")
    p = int(round(depth * n))
    ids = head + hay[:p] + needle + hay[p:] + question
    return NeedlePrompt(ids, number, name, needle, len(head) + p, depth)


def score_answer(text: str, answer: str) -> bool:
    """Exact match: the generated text's first number (after optional spaces) is ``answer``."""
    found = re.match(r"\s*(\d+)", text)
    return bool(found) and found.group(1) == answer


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: NeedlePrompt, *, device, max_new_tokens: int = 8) -> str:
    ids = torch.tensor([prompt.input_ids], device=device)
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def needle_grid(model, tokenizer, haystacks: list, lengths: list[int], depths: list[float], trials: int, *,
                device, seed: int = 0, log=print) -> dict:
    """Accuracy ``[len(lengths)][len(depths)]`` over ``trials`` prompts per cell (same prompts for
    every model given the same seed and haystacks)."""
    accuracy, samples = [], []
    for L in lengths:
        row = []
        for d in depths:
            rng = random.Random(f"{seed}-{L}-{d}")
            hits = 0
            for t in range(trials):
                hay = haystacks[t % len(haystacks)]
                prompt = make_needle_prompt(tokenizer, hay, L, d, rng)
                text = greedy_answer(model, tokenizer, prompt, device=device, max_new_tokens=len(tokenizer.encode(
                    " " + prompt.answer)) + 2)
                ok = score_answer(text, prompt.answer)
                hits += ok
                samples.append({"length": L, "depth": d, "trial": t, "name": prompt.name, "answer": prompt.answer,
                                "needle_start": prompt.needle_start, "generated": text, "correct": ok})
            row.append(hits / trials)
            log(f"  needle L={L} depth={d:.2f}: {hits}/{trials}")
        accuracy.append(row)
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": accuracy,
            "mean_accuracy": float(np.mean(accuracy)), "samples": samples}


# ---- throughput ------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def can_evict(model) -> bool:
    """Whether ``model`` builds an ACP eviction cache (a foxacp FoX model with QK-norm)."""
    config = model.config
    return (hasattr(model, "acp_eviction_cache") and bool(getattr(config, "uses_forget_gate", False))
            and bool(getattr(config, "use_qk_norm", False)))


def _cache_bytes(cache) -> int | None:
    """Bytes a decode cache holds: foxacp's ``memory_bytes()``, else the keys and values of a
    Hugging Face cache's layers; None where neither is there."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    tensors = [t for layer in getattr(cache, "layers", None) or () for t in (getattr(layer, "keys", None),
                                                                               getattr(layer, "values", None))
               if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) if tensors else None


@torch.no_grad()
def throughput(model, *, prompt_len: int, decode_tokens: int, batch: int, vocab: int, device, repeats: int = 3,
               seed: int = 0, evict: bool = False) -> dict:
    """Median prefill and decode speed over ``repeats`` runs (after one warm-up run).

    Prefill: one forward over ``batch x prompt_len`` random tokens (cache on, logits of the last
    position only). Decode: ``decode_tokens`` single-token forwards from that cache, greedy.
    ``evict``: both go through ``model.acp_eviction_cache(prompt_len + decode_tokens)`` (ACP
    KV-cache eviction, see :func:`can_evict`) instead of the model's own cache. ``cache_bytes``:
    the cache's memory after the last run (None where it cannot be measured); with ``evict``
    also ``kept_key_fraction``, the keys kept per kv head of the forgetting layers over the
    cached positions.
    """
    if evict and not can_evict(model):
        raise ValueError("throughput(evict=True) needs a FoX model with QK-norm (ACP eviction)")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    prefill_s, decode_s = [], []
    for run in range(repeats + 1):
        given = model.acp_eviction_cache(prompt_len + decode_tokens) if evict else None
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, **{CACHE_NAME: given}, use_cache=True, logits_to_keep=1)
        _sync(device)
        t1 = time.perf_counter()
        cache = getattr(out, CACHE_NAME)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, **{CACHE_NAME: cache}, use_cache=True)
            cache = getattr(out, CACHE_NAME)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
        if run:  # run 0 is the warm-up
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
    prefill, decode = float(np.median(prefill_s)), float(np.median(decode_s))
    row = {"prompt_len": prompt_len, "batch": batch, "decode_tokens": decode_tokens, "repeats": repeats,
           "prefill_s": prefill, "decode_s": decode,
           "prefill_tokens_per_s": batch * prompt_len / prefill, "decode_tokens_per_s": batch * decode_tokens / decode,
           "cache": "evict" if evict else "full", "cache_bytes": _cache_bytes(cache)}
    if evict:
        kept = [n for layer in cache.layers if hasattr(layer, "kept") for n in layer.kept()]
        positions = cache.get_seq_length()
        row["kept_key_fraction"] = sum(kept) / (len(kept) * positions) if kept and positions else 1.0
    return row


# ---- all of `foxacp eval` ---------------------------------------------------------------------
def run_eval(models, store, *, seq_len: int, num_seqs: int, val_fraction: float, tasks, device, dtype,
             smooth: int | None = None, needle_lengths=None, needle_depths=(0.0, 0.5, 1.0), needle_trials: int = 4,
             throughput_len: int | None = None, throughput_batch: int = 1, decode_tokens: int = 64,
             repeats: int = 3, log=print) -> dict:
    """All evaluations for ``models`` (:class:`~foxacp.analysis.loading.LoadedModel`); a JSON-ready dict."""
    from .loading import heldout_windows, set_acp, store_tokenizer

    windows = heldout_windows(store, seq_len, num_seqs, val_fraction)
    window = smooth or max(1, seq_len // 64)
    res = {"settings": {"seq_len": seq_len, "num_seqs": len(windows.input_ids), "val_fraction": val_fraction,
                        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "tasks": list(tasks)},
           "data": windows.source, "models": [], "loss": [], "acp_parity": {}, "position": {},
           "position_window": window, "needle": {}, "throughput": []}
    tokenizer = haystacks = None
    if "needle" in tasks:
        tokenizer = store_tokenizer(store)
        needle_lengths = needle_lengths or sorted({max(64, seq_len // 4), max(64, seq_len // 2), seq_len})
        hay = heldout_windows(store, max(needle_lengths), max(1, needle_trials), val_fraction)
        haystacks = [row[1:].tolist() for row in hay.input_ids]  # drop the BOS
    for loaded in models:
        model = loaded.model.to(device=device, dtype=dtype).eval()
        res["models"].append({"name": loaded.name, "source": loaded.source, "step": loaded.step,
                              "architecture": getattr(model.config, "architecture", type(model).__name__)})
        settings = ("on", "off") if loaded.is_fox else ("n/a",)
        original_acp = bool(getattr(model.config, "acp", False))
        losses = {}
        for acp in settings:
            if loaded.is_fox:
                set_acp(model, acp == "on")
            label = loaded.name if acp == "n/a" else f"{loaded.name} ACP {acp}"
            if "loss" in tasks or "position" in tasks:
                log(f"{label}: loss on {len(windows.input_ids)} windows of {seq_len}")
                losses[acp] = per_token_losses(model, windows.input_ids, windows.labels, device=device)
                res["loss"].append({"model": loaded.name, "acp": acp, **loss_summary(losses[acp])})
                if "position" in tasks:
                    res["position"][label] = position_curve(losses[acp], window)
            if "needle" in tasks:
                log(f"{label}: needle grid")
                res["needle"][label] = needle_grid(model, tokenizer, haystacks, needle_lengths, list(needle_depths),
                                                     needle_trials, device=device, log=log)
            if "throughput" in tasks:
                log(f"{label}: throughput")
                t = throughput(model, prompt_len=throughput_len or seq_len, decode_tokens=decode_tokens,
                                 batch=throughput_batch, vocab=model.config.vocab_size, device=device, repeats=repeats)
                res["throughput"].append({"label": label, "model": loaded.name, "acp": acp, **t})
        if "throughput" in tasks and can_evict(model):  # ACP KV-cache eviction beside the full cache
            label = f"{loaded.name} ACP evict"
            log(f"{label}: throughput")
            t = throughput(model, prompt_len=throughput_len or seq_len, decode_tokens=decode_tokens,
                           batch=throughput_batch, vocab=model.config.vocab_size, device=device, repeats=repeats,
                           evict=True)
            res["throughput"].append({"label": label, "model": loaded.name, "acp": "evict", **t})
        if loaded.is_fox and "on" in losses and "off" in losses:
            res["acp_parity"][loaded.name] = acp_parity(losses["on"], losses["off"], float(model.config.acp_log_eps))
        if loaded.is_fox:
            set_acp(model, original_acp)
        model.to("cpu")
    return res
