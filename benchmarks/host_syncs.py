"""Host synchronisations per training step and per decoding step, counted on any device.

A host sync is a call that makes Python wait for a tensor's value: ``Tensor.item``, ``tolist``,
``__bool__``/``__int__``/``__float__`` and ``torch.cuda.synchronize``. On a GPU each one stalls the
launch queue; on a CPU the same calls happen, so counting them here measures the code path (the
count, not the cost). Run it on two checkouts to compare::

    PYTHONPATH=src python benchmarks/host_syncs.py --json runs/host_syncs.json

Reports, for a small FoX (Pro) model with ACP on: one training step (forward + backward) on plain
rows and on packed sequences (``cu_seqlens``), with and without ACP statistics, and one decoding
step with a left-padded batch; host seconds per step beside each count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from foxacp.models import FoxForCausalLM, preset_config

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__")


@contextlib.contextmanager
def count_syncs():
    """Count host syncs inside the block (wraps the Tensor methods that read values)."""
    counts = {name: 0 for name in (*SYNC_METHODS, "cuda.synchronize")}
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    sync = torch.cuda.synchronize
    torch.cuda.synchronize = wrap("cuda.synchronize", lambda *_a, **_k: sync())
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.cuda.synchronize = sync


def measure(fn, repeats: int = 3) -> dict:
    fn()  # warm up (first-call work is not per step)
    with count_syncs() as counts:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        seconds = (time.perf_counter() - start) / repeats
    per_step = {k: v / repeats for k, v in counts.items() if v}
    return {"syncs": sum(per_step.values()), "by_call": per_step, "host_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="fox-pro-tiny")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FoxForCausalLM(preset_config(args.preset, acp=True)).to(device)
    T = args.seq_len
    ids = torch.randint(0, model.config.vocab_size, (1, T), device=device)
    cu = torch.tensor([0, T // 4, T // 2, T], device=device)

    def train_step(cu_seqlens=None):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, cu_seqlens=cu_seqlens).loss.backward()

    def decode_step():
        batch = torch.randint(0, model.config.vocab_size, (2, 64), device=device)
        mask = torch.ones_like(batch)
        mask[1, :10] = 0
        with torch.no_grad():
            out = model(input_ids=batch, attention_mask=mask, use_cache=True)
            model(input_ids=batch[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                  past_key_values=out.past_key_values, use_cache=True)

    rows = {}
    for stats in (False, True):
        model.collect_acp_stats(stats)
        rows[f"train plain, stats {'on' if stats else 'off'}"] = measure(train_step)
        rows[f"train packed, stats {'on' if stats else 'off'}"] = measure(lambda: train_step(cu))
    model.collect_acp_stats(False)
    rows["decode (prefill 64 + 1 step, left padded)"] = measure(decode_step)
    layers = model.config.num_hidden_layers
    print(f"{args.preset} ({layers} layers), T={T}, {device}")
    print(f"{'step':44s} {'syncs':>7s} {'host ms':>9s}  by call")
    for name, row in rows.items():
        print(f"{name:44s} {row['syncs']:7.1f} {1e3 * row['host_seconds']:9.1f}  {row['by_call']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "layers": layers, "seq_len": T, "device": str(device), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
