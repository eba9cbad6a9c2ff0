"""The training loop: build, resume, then step / log / evaluate / checkpoint until done.

    trainer = Trainer(load_config("configs/fox-pro-tiny.yaml"))
    trainer.fit()

One process on CPU or one GPU, or many under ``torchrun`` (FSDP2); the code path is the same.
A step draws ``global_tokens`` tokens (``micro_batch`` sequences per forward, accumulated),
clips the gradient norm, sets the learning rate from the tokens seen, and steps AdamW.

With ``run.time_budget_s`` the schedule is planned for the wall clock: the first
``run.budget_probe_steps`` steps run on the configured schedule (its warmup, so their learning
rate is at most the plan's); then rank 0 takes the median step time of those steps but the first
(compilation) and sets ``optim.total_tokens`` to the steps that fit in what is left of the budget
(never more than configured), scaling ``optim.warmup_tokens`` by the same factor, so the cosine
reaches its end when the budget does. Every rank gets the same plan; it is logged
(``{"step", "schedule"}`` in metrics.jsonl) and checkpointed, so a resumed run keeps it.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import statistics
import time
from pathlib import Path

import torch

from ..data import WindowLoader, flatten_packed, open_store
from ..models import FoxForCausalLM, preset_config
from . import checkpoint, distributed
from .config import TrainConfig
from .flops import peak_flops, training_flops_per_token
from .metrics import MetricLogger, progress_bar
from .optim import build_optimizer, lr_at, set_lr


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or a weight became NaN or infinite; checkpoints are left as they were."""


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.started = time.perf_counter()  # the budget of run.time_budget_s counts from here
        self.cfg = cfg
        self.info = distributed.init(cfg.run.device)
        self.out_dir = Path(cfg.run.out_dir)
        _seed_everything(cfg.run.seed)
        self.bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and self.info.device.type == "cuda")

        builtin = {"max_docs": cfg.data.max_docs} if cfg.data.max_docs else {}
        self.store = open_store(cfg.data.source, tokenizer=cfg.data.tokenizer, **builtin)
        per_rank, remainder = divmod(cfg.global_sequences, self.info.world_size * cfg.batch.micro_batch)
        if remainder or per_rank == 0:
            raise ValueError(f"global batch of {cfg.global_sequences} sequences does not split into "
                             f"{self.info.world_size} ranks x micro_batch {cfg.batch.micro_batch}")
        self.accumulation = per_rank
        self.train_data = self._loader("train")
        self.val_data = self._loader("val")

        overrides = {"vocab_size": self.store.vocab_size, "bos_token_id": self.store.bos_id,
                     "eos_token_id": self.store.eot_id,
                     "activation_checkpointing": cfg.run.activation_checkpointing, **cfg.model.overrides}
        self.model_config = preset_config(cfg.model.preset, **overrides)
        model = FoxForCausalLM(self.model_config).to(self.info.device)
        model.collect_acp_stats(True)
        self.model = distributed.parallelize(model, list(model.model.layers), self.info, compile=cfg.run.compile,
                                             bf16=self.bf16)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step, self.tokens = 0, 0
        self.schedule: dict | None = None  # the budget plan, once made (or resumed)
        self.metrics = MetricLogger(self.out_dir, enabled=self.info.is_main, tensorboard=cfg.run.tensorboard,
                                    wandb_project=cfg.run.wandb_project, resume=resume, config=cfg.to_dict())
        self._stop_signal: int | None = None
        resumed = resume and self.resume()
        if not resumed and cfg.run.init_from is not None:
            self.init_weights(cfg.run.init_from)

    # ----------------------------------------------------------------- setup helpers
    def _loader(self, split: str) -> WindowLoader:
        d = self.cfg.data
        return WindowLoader(self.store, d.seq_len, self.cfg.batch.micro_batch, mode=d.mode, seed=self.cfg.run.seed,
                            rank=self.info.rank, world_size=self.info.world_size, split=split,
                            val_fraction=d.val_fraction, emit_cu_seqlens=d.packed_cu_seqlens)

    @property
    def total_steps(self) -> int:
        steps = math.ceil(self.cfg.optim.total_tokens / self.cfg.batch.global_tokens)
        return min(steps, self.cfg.run.max_steps) if self.cfg.run.max_steps else steps

    def resume(self) -> bool:
        """Load the newest checkpoint under ``run.out_dir`` that verifies, naming each newer one
        it skips and why. False when there is no checkpoint; ``CheckpointError`` when none verifies."""
        found, skipped = distributed.from_main(lambda: checkpoint.newest_verified(self.out_dir))
        reasons = [f"skipped checkpoint {folder}: {reason}" for folder, reason in skipped]
        if found is None:
            if skipped:
                root = checkpoint.checkpoint_root(self.out_dir)
                raise checkpoint.CheckpointError(f"no checkpoint under {root} verifies:\n" + "\n".join(reasons))
            return False
        state = checkpoint.load(found, self.model, self.optimizer, verify_files=False)
        self.step, self.tokens = state["step"], state["tokens"]
        self.train_data.load_state_dict(state["loader"])
        if state.get("schedule") is not None:
            self._set_schedule(state["schedule"])
        self.metrics.rewind(self.step)
        if self.info.is_main:
            for line in reasons:
                print(line, flush=True)
            print(f"resumed from {found} (step {self.step}, {self.tokens} tokens)", flush=True)
        return True

    def init_weights(self, source: str) -> None:
        """Start from the weights of ``source``: a checkpoint folder, a run folder (its newest
        checkpoint that verifies) or a Hugging Face folder. Optimizer, step and data start fresh."""
        path = Path(source)
        try:
            if checkpoint.checkpoint_root(path).is_dir():
                found, skipped = distributed.from_main(lambda: checkpoint.newest_verified(path))
                if found is None:
                    raise ValueError("no checkpoint there verifies: " + "; ".join(f"{f.name}: {r}" for f, r in skipped))
                path = found
            if (path / "trainer.json").is_file():
                checkpoint.load_model_weights(path, self.model)
            elif (path / "config.json").is_file():
                checkpoint.set_full_weights(self.model, FoxForCausalLM.from_pretrained(str(path)).state_dict())
            else:
                raise ValueError("it is not a checkpoint folder (trainer.json), a run folder (checkpoints/) "
                                 "or a Hugging Face folder (config.json)")
        except (ValueError, RuntimeError, OSError) as err:  # RuntimeError: names or shapes differ
            raise ValueError(f"run.init_from={source!r}: {err}") from err
        if self.info.is_main:
            print(f"initialised the weights from {path}", flush=True)

    def save_checkpoint(self) -> Path:
        state = {"tokens": self.tokens, "loader": self.train_data.state_dict(), "config": self.cfg.to_dict(),
                 "world_size": self.info.world_size, "vocab_size": self.store.vocab_size,
                 "bos_token_id": self.store.bos_id, "eos_token_id": self.store.eot_id,
                 "tokenizer": getattr(self.store, "tokenizer_name", None), "schedule": self.schedule}
        return checkpoint.save(self.out_dir, self.step, self.model, self.optimizer, state, self.cfg.run.keep_last,
                               self.cfg.run.keep_every)

    @property
    def stop_signal(self) -> int | None:
        """The signal (SIGINT, SIGTERM) that stopped ``fit()`` after its checkpoint, or None."""
        return self._stop_signal

    # ----------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Train until ``total_steps``; returns the metric records of this call."""
        records = []
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        bar = progress_bar(self.total_steps, self.step, self.info.is_main and self.cfg.run.progress)
        batches = iter(self.train_data)
        with self._signals_checkpoint():
            while self.step < self.total_steps and self._stop_signal is None:
                start = time.perf_counter()
                lr = lr_at(self.tokens, self.cfg.optim)
                set_lr(self.optimizer, lr)
                loss, grad_norm = self.train_step([next(batches) for _ in range(self.accumulation)])
                self.step += 1
                self.tokens += self.cfg.batch.global_tokens
                record = self._step_record(loss, grad_norm, lr, time.perf_counter() - start)
                records.append(record)
                if self.cfg.run.time_budget_s and self.schedule is None and len(records) == self.cfg.run.budget_probe_steps:
                    self._plan_schedule([r["step_time_s"] for r in records[1:]])
                if self.step % self.cfg.run.log_every == 0 or self.step == self.total_steps:
                    self.metrics.log(record)
                mfu = "-" if record["mfu"] is None else f"{record['mfu']:.1%}"
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", mfu=mfu,
                                kept=f"{record['acp']['kept_fraction']:.2f}")
                bar.update(1)
                if self.cfg.run.eval_every and self.step % self.cfg.run.eval_every == 0:
                    self.metrics.log({"step": self.step, "val_loss": self.evaluate()})
                if self.cfg.run.ckpt_every and self.step % self.cfg.run.ckpt_every == 0:
                    self.save_checkpoint()
        bar.close()
        if self._stop_signal is not None:
            path = self.save_checkpoint()
            if self.info.is_main:
                print(f"stopped by signal {self._stop_signal}: checkpoint {path}", flush=True)
            return records
        val = self.evaluate()
        self.metrics.log({"step": self.step, "val_loss": val, "final": True})
        path = self.save_checkpoint()
        if self.info.is_main:
            print(f"done: step {self.step}, validation loss {val:.4f}, checkpoint {path}", flush=True)
        return records

    def _plan_schedule(self, step_times: list[float]) -> None:
        """Fit the schedule to what is left of ``run.time_budget_s`` (see the module docstring)."""
        optim, per_step = self.cfg.optim, self.cfg.batch.global_tokens

        def plan() -> dict:
            step_s = statistics.median(step_times)
            left = self.cfg.run.time_budget_s - (time.perf_counter() - self.started)
            steps = min(self.step + max(int(left // step_s), 0), math.ceil(optim.total_tokens / per_step))
            total = max(steps, self.step) * per_step
            return {"total_tokens": total, "warmup_tokens": round(optim.warmup_tokens * total / optim.total_tokens),
                    "planned_steps": total // per_step, "step_time_s": step_s, "budget_left_s": left}

        self._set_schedule(distributed.from_main(plan))
        self.metrics.log({"step": self.step, "schedule": self.schedule})
        if self.info.is_main:
            print(f"schedule planned for run.time_budget_s={self.cfg.run.time_budget_s:g}: {self.schedule}", flush=True)

    def _set_schedule(self, schedule: dict) -> None:
        self.schedule = schedule
        self.cfg.optim.total_tokens, self.cfg.optim.warmup_tokens = schedule["total_tokens"], schedule["warmup_tokens"]

    def train_step(self, micro_batches: list[dict]) -> tuple[float, float]:
        """Forward/backward over the micro-batches, clip, optimizer step. Returns (loss, grad norm).

        Raises ``TrainingDiverged`` before the optimizer step when the loss or the gradient norm is
        not finite, and after it when a weight is not finite, so no such step reaches a checkpoint.
        """
        self.model.train()
        total = torch.zeros((), device=self.info.device)
        for batch in micro_batches:
            try:
                with self._autocast():
                    loss = self.model(**self._to_device(batch)).loss / len(micro_batches)
            except ValueError as err:  # e.g. ACP refuses a NaN threshold computed from NaN weights
                if (bad := self._non_finite_weight(all_ranks=False)) is not None:
                    raise self._diverged(f"weight {bad} is not finite ({err})") from err
                raise
            loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # one host read for both (each read waits for the whole backward)
        loss_value, grad_value = torch.stack([distributed.all_reduce_mean(total).float(), grad_norm.float()]).tolist()
        if not math.isfinite(loss_value):
            raise self._diverged(f"the loss is {loss_value}")
        if not math.isfinite(grad_value):
            raise self._diverged(f"the gradient norm is {grad_value} (loss {loss_value:.4f})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if (bad := self._non_finite_weight()) is not None:
            raise self._diverged(f"weight {bad} is not finite after the optimizer step")
        return loss_value, grad_value

    def _non_finite_weight(self, all_ranks: bool = True) -> str | None:
        """Name of the first parameter holding NaN or inf (on any rank, or on this one), or None.

        One multi-tensor max-abs pass over this rank's shards (NaN and inf propagate through it) and
        one host read, every step: a check per parameter would launch two kernels per parameter
        (~300 at 125M) while the GPU waits for the next step."""
        names, shards = [], []
        for name, param in self.model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param  # this rank's FSDP shard
            names.append(name)
            shards.append(local.detach() if local.numel() else local.new_zeros(1))  # no inf norm of nothing
        maxima = torch._foreach_norm(shards, ord=math.inf)
        bad = (~torch.stack([m.float() for m in maxima]).isfinite()).float()
        if all_ranks:
            bad = distributed.all_reduce_mean(bad)
        return names[int(bad.nonzero()[0])] if bool(bad.any()) else None

    def _diverged(self, cause: str) -> TrainingDiverged:
        """The stop error for step ``self.step + 1``: what went wrong and where to resume from."""
        good = checkpoint.latest(self.out_dir)
        where = (f"the last good checkpoint {good} is intact: resume from it with --resume (e.g. with a lower optim.lr)"
                 if good is not None else "no checkpoint was written before it")
        return TrainingDiverged(f"training diverged at step {self.step + 1}: {cause}. Nothing of this step was "
                                f"saved; {where}")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss over ``run.eval_batches`` micro-batches (same windows every time)."""
        self.model.eval()
        losses = []
        for i, batch in enumerate(self.val_data.iter_epoch(0)):
            if i >= self.cfg.run.eval_batches:
                break
            with self._autocast():
                losses.append(self.model(**self._to_device(batch)).loss.float())
        self.model.train()
        if not losses:
            return float("nan")
        return float(distributed.all_reduce_mean(torch.stack(losses).mean()))

    # ----------------------------------------------------------------- logging
    def _step_record(self, loss: float, grad_norm: float, lr: float, seconds: float) -> dict:
        layer_stats = self._acp_layer_stats()
        kept = _kept_fraction(layer_stats)
        cfg = self.model_config
        flops = training_flops_per_token(self.model, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                                         head_dim=cfg.head_dim, seq_len=self.cfg.data.seq_len,
                                         kept_fraction=kept)
        tokens_per_s = self.cfg.batch.global_tokens / seconds
        peak = peak_flops(self.info.device)
        return {
            "step": self.step, "tokens": self.tokens, "loss": loss, "grad_norm": grad_norm, "lr": lr,
            "step_time_s": seconds, "tokens_per_s": tokens_per_s,
            "mfu": None if peak is None else tokens_per_s * flops.total_computed / (peak * self.info.world_size),
            "flops_per_token": flops.as_dict(),
            "acp": {"kept_fraction": kept,
                    "paper_kept_fraction": _kept_fraction(layer_stats, "paper_kept"),
                    "layer_kept_fraction": [s["kept_fraction"] for s in layer_stats],
                    "layer_threshold": [s["threshold"] for s in layer_stats]},
        }

    def _acp_layer_stats(self) -> list[dict]:
        """Per layer: tiles kept (by the run's rule and by the paper's), causal tiles and the mean
        threshold of the last forward (1.0 / None if dense). All layers are read back in one host
        sync: per-layer reads would stall the GPU queue once per layer and step."""
        all_stats = self.model.acp_stats()
        rows = [torch.stack([s.kept_tiles.sum().double(), s.paper_kept_tiles.sum().double(), s.causal_tiles.sum().double(),
                             s.threshold.double().mean() if s.threshold is not None else s.causal_tiles.new_tensor(
                                 float("nan"), dtype=torch.float64)])
                for s in all_stats if s is not None]
        values = iter(torch.stack(rows).tolist() if rows else [])
        out = []
        for stats in all_stats:
            if stats is None:
                out.append({"kept_fraction": 1.0, "threshold": None, "kept": 0, "paper_kept": 0, "causal": 0})
                continue
            kept, paper_kept, causal, threshold = next(values)
            out.append({"kept_fraction": kept / causal if causal else 1.0,
                        "threshold": None if math.isnan(threshold) else threshold,
                        "kept": int(kept), "paper_kept": int(paper_kept), "causal": int(causal)})
        return out

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict) -> dict:
        """Model inputs on the device (labels are already the next tokens); packed rows become
        one sequence with global ``cu_seqlens``."""
        if "cu_seqlens" in batch:
            batch = flatten_packed(batch)
        inputs = {"input_ids": batch["input_ids"], "shift_labels": batch["labels"]}
        if "cu_seqlens" in batch:
            inputs["cu_seqlens"] = batch["cu_seqlens"]
        return {"return_logits": False, **{k: v.to(self.info.device, non_blocking=True) for k, v in inputs.items()}}

    @contextlib.contextmanager
    def _signals_checkpoint(self):
        """Ctrl-C / SIGTERM finish the current step, write a checkpoint, and return."""
        def handler(signum, frame):
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def close(self) -> None:
        self.metrics.close()


def _kept_fraction(layer_stats: list[dict], key: str = "kept") -> float:
    causal = sum(s["causal"] for s in layer_stats)
    return sum(s[key] for s in layer_stats) / causal if causal else 1.0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
