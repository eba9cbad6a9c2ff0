"""Which keys each position of a batch may see: built and validated once, shared by every layer.

A batch is laid out one of three ways:

* plain causal: every row is one sequence (``SequenceLayout.causal``);
* left padded: row ``b`` starts at ``seq_start[b]``; earlier positions are neither attended nor
  output (generation batches);
* packed: ``B == 1`` and ``cu_seqlens`` ``(N+1,)`` cuts the row into sequences; nothing crosses a
  boundary, and the forget-gate decay restarts at each one (training on documents).

The layout is a property of the batch, not of a layer: the model builds it once per forward and
passes it to every attention call, so the checks (and their host syncs) and the per-key bounds
``key_lo``/``key_hi`` happen once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceLayout:
    """Per-key visibility of a batch of ``batch`` rows of ``seqlen`` key positions.

    Position ``p`` of row ``b`` sees keys ``key_lo[b, p] <= j <= p``; key ``j`` is seen by
    positions up to ``key_hi[b, j]`` (both ``(B, seqlen)`` int32, ``None`` when plain causal).
    """

    batch: int
    seqlen: int
    seq_start: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    key_lo: torch.Tensor | None = None
    key_hi: torch.Tensor | None = None

    @property
    def is_packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def is_left_padded(self) -> bool:
        return self.seq_start is not None

    @classmethod
    def causal(cls, batch: int, seqlen: int) -> "SequenceLayout":
        return cls(batch, seqlen)

    @classmethod
    def left_padded(cls, seq_start: torch.Tensor, seqlen: int, device=None) -> "SequenceLayout":
        """``seq_start`` ``(B,)`` ints in ``[0, seqlen)``: the first real position of each row."""
        if not isinstance(seq_start, torch.Tensor) or seq_start.dtype.is_floating_point \
                or seq_start.dtype == torch.bool or seq_start.dim() != 1:
            raise TypeError(f"seq_start must be an integer tensor of shape (B,), got "
                            f"{getattr(seq_start, 'dtype', type(seq_start).__name__)} "
                            f"of shape {tuple(getattr(seq_start, 'shape', ()))}")
        if bool(((seq_start < 0) | (seq_start >= seqlen)).any()):
            raise ValueError(f"seq_start values must lie in [0, {seqlen}), got {seq_start.tolist()}")
        device = seq_start.device if device is None else device
        batch = seq_start.shape[0]
        lo = seq_start.to(device=device, dtype=torch.int32)[:, None].expand(batch, seqlen).contiguous()
        hi = torch.full((batch, seqlen), seqlen - 1, dtype=torch.int32, device=device)
        return cls(batch, seqlen, seq_start=seq_start.to(device), key_lo=lo, key_hi=hi)

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, seqlen: int, device=None) -> "SequenceLayout":
        """``cu_seqlens`` ``(N+1,)`` int32/int64 offsets: 0, strictly increasing, ending at ``seqlen``."""
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be an int32/int64 tensor, got "
                            f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
        device = cu_seqlens.device if device is None else device
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with >= 2 offsets, got shape {tuple(cu.shape)}")
        ends_ok, increasing = torch.stack([(cu[0] == 0) & (cu[-1] == seqlen), (cu[1:] > cu[:-1]).all()]).tolist()
        if not ends_ok:  # (one host sync for both checks)
            raise ValueError(f"cu_seqlens must start at 0 and end at T={seqlen}, got {cu.tolist()}")
        if not increasing:
            raise ValueError(f"cu_seqlens must be strictly increasing, got {cu.tolist()}")
        seq_id = torch.searchsorted(cu, torch.arange(seqlen, device=device), right=True) - 1
        lo = cu[seq_id].to(torch.int32)[None].contiguous()
        hi = (cu[seq_id + 1] - 1).to(torch.int32)[None].contiguous()
        return cls(1, seqlen, cu_seqlens=cu, key_lo=lo, key_hi=hi)

    @classmethod
    def from_arguments(cls, seq_start, cu_seqlens, batch: int, seqlen_q: int, seqlen_k: int,
                       device) -> "SequenceLayout":
        """The layout of :func:`foxacp.forgetting_attention`'s ``seq_start``/``cu_seqlens``."""
        if seq_start is not None and cu_seqlens is not None:
            raise ValueError("pass seq_start or cu_seqlens, not both")
        if seq_start is not None:
            layout = cls.left_padded(seq_start, seqlen_k, device)
        elif cu_seqlens is not None:
            layout = cls.packed(cu_seqlens, seqlen_k, device)
        else:
            return cls.causal(batch, seqlen_k)
        layout.check(batch, seqlen_q, seqlen_k)
        return layout

    def check(self, batch: int, seqlen_q: int, seqlen_k: int) -> None:
        """Raise unless this layout fits an attention call of these sizes (no host sync)."""
        if self.seqlen != seqlen_k:
            raise ValueError(f"the sequence layout covers {self.seqlen} key positions, the keys have {seqlen_k}")
        if self.is_packed:
            if batch != 1:
                raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along T), got B={batch}")
            if seqlen_q != seqlen_k:
                raise ValueError(f"cu_seqlens needs Tq == Tk, got Tq={seqlen_q}, Tk={seqlen_k}")
        elif self.is_left_padded and self.batch != batch:
            raise ValueError(f"seq_start must have shape ({batch},), got ({self.batch},)")
