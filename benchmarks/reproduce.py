"""Issue 14: the ACP paper's claims checked on a model foxacp trains, end to end in one lease.

    python benchmarks/reproduce.py --gpus 4 --deadline-min 24 --train-min 13 --out $OUT/repro
    python benchmarks/reproduce.py --toy --out runs/repro-toy      # every stage on CPU at toy size

Stages (``--stages``), in order; each writes ``<out>/<stage>.json`` when it ends, and
``summary.json`` / ``report.md`` are rewritten after every stage, so a run killed at its deadline
still returns what was done. A stage that no longer fits before ``--deadline-min`` is shrunk
(fewer steps) or skipped, with the reason recorded; a stage that fails is recorded and the
stages that need its result are skipped.

1. corpus: ``--data`` (default ``python-packages``: one document per installed package, its
   files in path order) tokenized with GPT-2; documents, tokens, the held-out split by document.
2. train: ``--config`` (FoX Pro 125M, 16k, the paper's recipe, ACP on) under
   ``torchrun --nproc_per_node=--gpus -m foxacp train`` with ``run.time_budget_s``: the trainer
   times its first steps and plans the cosine (and the warmup, scaled alike) for the steps that
   fit ``--train-min``. Records the attention FLOPs pruned per step (the run's rule and the
   paper's) and the share of all training FLOPs.
3. parity: the first ``--parity-steps`` steps of the same schedule with ACP off, and with ACP on
   at micro-batch m and m/2 (multi_gpu.py's noise floor: only the accumulation order differs).
4. analysis: ``foxacp analyze`` of the trained checkpoint: kept fraction per layer, per-head
   savings, savings vs context length (up to ``--max-analysis-len``), pruning maps.
5. eval: held-out loss with ACP on and off, largest per-token difference, loss by position.
6. throughput: training steps (forward, backward, AdamW) on the same batches on one device:
   FoX + ACP and FoX dense from the trained weights, ``--transformer`` (SDPA) from scratch;
   tokens/s, speed-ups, and the attention core's share of the (eager) step time.
7. scaling: tokens/s on 1, 2, 4, ... ``--gpus`` GPUs for ``--scaling-presets`` (same global
   batch), efficiency; the run on the most GPUs checkpoints halfway and is resumed on 1 and 2.
8. report: ``report.md`` (paper values beside ours, what differs from the paper), ``summary.json``.

Checkpoints and logs go to ``--work`` (a new temporary folder by default), never to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import multi_gpu
from multi_gpu import Launcher, losses_by_step, max_loss_gap, resume_elsewhere, run_noise_floor

STAGES = ("corpus", "train", "parity", "analysis", "eval", "throughput", "scaling")
NEEDS = {"train": "corpus", "parity": "corpus", "analysis": "train", "eval": "train", "throughput": "train",
         "scaling": "corpus"}
REPORT_RESERVE_S = 20  # kept free before the deadline for the last summary and report
PAPER = {  # the ACP paper (Lin et al., 2025, arXiv 2504.06949), for the report's "paper" column
    "attention_flops_pruned": "about 70% (125M-760M, 4k-16k)",
    "longer_context": "more pruned at longer contexts",
    "throughput": "+10% to +35% training throughput",
    "loss": "unchanged (ACP on vs off)",
    "heads": "most savings from a minority of local heads",
}
TOY = {  # --toy: every stage on CPU with gloo processes in about a minute on 2 cores
    "device": "cpu", "gpus": 2, "config": "fox-pro-tiny-cpu", "transformer": "transformer-pro-tiny",
    "corpus_max_mb": 2.0, "deadline_min": 3.0, "train_min": 0.08, "parity_steps": 3,
    "scaling_presets": ["fox-pro-tiny"], "scaling_steps": 3, "scaling_warmup": 1, "throughput_steps": 2,
    "analysis_windows": 2, "eval_windows": 2, "min_analysis_len": 32, "max_analysis_len": 256, "compile": False,
    "toy_overrides": ["data.seq_len=128", "batch.global_tokens=512", "batch.micro_batch=1", "run.eval_batches=1"],
}


class Deadline:
    def __init__(self, minutes: float):
        self.start = time.perf_counter()
        self.end = self.start + 60 * minutes

    def left(self) -> float:
        """Seconds until the deadline, less the reserve for the report."""
        return self.end - time.perf_counter() - REPORT_RESERVE_S


class Skip(Exception):
    """A stage not run, and why."""


class Reproduction:
    """The stages, sharing the corpus, the launcher, the deadline and the summary."""

    def __init__(self, args):
        self.args, self.out = args, args.out
        self.work = args.work or Path(tempfile.mkdtemp(prefix="foxacp-reproduce-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = Deadline(args.deadline_min)
        self.summary = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": device_name(args),
                        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        "paper": PAPER, "stages": {}}
        self.store = self.launch = self.cfg = None

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        for stage in STAGES:
            start = time.perf_counter()
            status = self.summary["stages"]
            need = NEEDS.get(stage)
            try:
                if stage not in self.args.stages:
                    raise Skip("not in --stages")
                if need and status.get(need, {}).get("status") != "done":
                    raise Skip(f"needs the {need} stage, which was {status.get(need, {}).get('status', 'not run')}")
                if self.deadline.left() <= 0:
                    raise Skip(f"the deadline (--deadline-min {self.args.deadline_min:g}) was reached")
                result = getattr(self, stage)()
                status[stage] = {"status": "done", "seconds": time.perf_counter() - start}
                self.summary[stage] = result
                (self.out / f"{stage}.json").write_text(json.dumps(result, indent=1))
            except Skip as why:
                status[stage] = {"status": "skipped", "reason": str(why)}
            except (Exception, SystemExit) as err:  # SystemExit: a launched run failed
                traceback.print_exc()
                status[stage] = {"status": "failed", "reason": f"{type(err).__name__}: {err}"[:500],
                                 "seconds": time.perf_counter() - start}
            print(f"== {stage}: {status[stage]}", flush=True)
            self.write()
        return self.summary

    def write(self) -> None:
        self.summary["elapsed_s"] = time.perf_counter() - self.deadline.start
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))
        (self.out / "report.md").write_text(report(self.summary))

    # ------------------------------------------------------------------ helpers
    def recipe(self) -> list[str]:
        """The overrides every training run shares (the config and its data, seed, logging)."""
        a = self.args
        compile_ = [] if a.compile is None else [f"run.compile={a.compile}"]
        return ["--config", a.config, f"data.source={self.store.path}", f"data.val_fraction={a.val_fraction}",
                f"run.seed={a.seed}", "run.progress=false", "run.log_every=1", "run.tensorboard=false",
                "run.keep_last=1", *compile_, *a.toy_overrides, *a.overrides]

    def step_estimate(self) -> tuple[float, float]:
        """(seconds per training step, seconds of start-up per launch) from the training run."""
        t = self.summary.get("train")
        if not t:
            raise Skip("no timing to size it from (the train stage did not run)")
        return t["median_step_time_s"], t["launch_overhead_s"]

    def fit_steps(self, wanted: int, minimum: int, runs: float, step_s: float, overhead: float, what: str) -> int:
        """The most steps (<= wanted) for which ``runs`` launches fit before the deadline."""
        left = self.deadline.left()
        steps = min(wanted, int((left / runs - overhead) / step_s)) if step_s > 0 else wanted
        if steps < minimum:
            raise Skip(f"{what} needs ~{runs * (overhead + minimum * step_s):.0f} s for {minimum} steps; "
                       f"{left:.0f} s were left before the deadline")
        return steps

    # ------------------------------------------------------------------ 1. corpus
    def corpus(self) -> dict:
        from foxacp.data import open_store, split_documents
        from foxacp.train.config import load_config

        a = self.args
        builtin = {"max_bytes": int(a.corpus_max_mb * 1e6)} if a.corpus_max_mb else {}
        self.store = open_store(a.data, tokenizer="gpt2", **builtin)
        self.cfg = load_config(a.config, [*a.toy_overrides, *a.overrides])
        self.launch = Launcher(self.recipe(), a.device, self.work)
        L = self.cfg.data.seq_len
        lengths = self.store.doc_lengths
        train_docs, val_docs = split_documents(len(lengths), a.val_fraction)
        meta = self.store.manifest.get("metadata", {}) if hasattr(self.store, "manifest") else {}
        windows = lambda docs: int(sum(lengths[docs] // L))  # noqa: E731  document-mode windows of L tokens
        return {"source": a.data, "store": str(self.store.path), "tokenizer": "gpt2", "metadata": meta,
                "documents": int(len(lengths)), "tokens": int(lengths.sum()),
                "train_documents": int(len(train_docs)), "val_documents": int(len(val_docs)),
                "train_tokens": int(lengths[train_docs].sum()), "val_tokens": int(lengths[val_docs].sum()),
                "val_fraction": a.val_fraction, "context": L,
                "share_of_documents_longer_than_context": float((lengths > L).mean()),
                "longest_document_tokens": int(lengths.max()),
                "train_windows": windows(train_docs), "val_windows": windows(val_docs),
                "train_tokens_in_windows": windows(train_docs) * L,
                "windowing": "document mode: windows of L tokens inside one document, remainders dropped; "
                             "no packing, so no document boundary masks attention work"}

    # ------------------------------------------------------------------ 2. train
    def train(self) -> dict:
        a = self.args
        budget = min(60 * a.train_min, self.deadline.left())
        note = None if budget == 60 * a.train_min else f"--train-min {a.train_min:g} cut to {budget:.0f} s by the deadline"
        # grace: start-up before the trainer's clock, the final evaluation and checkpoint
        timeout = budget + max(120.0, 0.15 * budget)
        run = self.work / "train"
        records = self.launch.train("train", a.gpus, run, [f"run.time_budget_s={budget:.1f}"], timeout_s=timeout)
        if not records:
            raise RuntimeError("the training run logged no step")
        from foxacp.train.metrics import read_metrics

        logged = read_metrics(run / "metrics.jsonl")
        schedule = next((r["schedule"] for r in logged if "schedule" in r), None)
        vals = [r["val_loss"] for r in logged if "val_loss" in r]
        curve = [pruning_point(r) for r in records]
        last = curve[max(0, len(curve) - max(1, len(curve) // 10)):]  # the last 10% of the steps
        timed = records[1:] or records
        if schedule:  # parity runs the first steps of this schedule
            self.cfg.optim.total_tokens, self.cfg.optim.warmup_tokens = schedule["total_tokens"], schedule["warmup_tokens"]
        plot_training(curve, self.out / "training_pruning.png")
        return {"preset": self.cfg.model.preset, "context": self.cfg.data.seq_len, "gpus": a.gpus,
                "global_tokens": self.cfg.batch.global_tokens, "steps": records[-1]["step"],
                "tokens": records[-1]["tokens"], "budget_s": budget, "budget_note": note, "schedule": schedule,
                "epochs": records[-1]["tokens"] / max(self.summary["corpus"]["train_tokens_in_windows"], 1),
                "median_step_time_s": statistics.median(r["step_time_s"] for r in timed),
                "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                "launch_overhead_s": max(self.launch.seconds - sum(r["step_time_s"] for r in records), 0.0),
                "wall_s": self.launch.seconds, "final_loss": records[-1]["loss"],
                "val_loss": vals[-1] if vals else None,
                "final_attention_flops_pruned": statistics.mean(p["attention_pruned"] for p in last),
                "final_paper_attention_flops_pruned": statistics.mean(p["paper_attention_pruned"] for p in last),
                "final_total_flops_pruned": statistics.mean(p["total_pruned"] for p in last),
                "final_layer_kept_fraction": records[-1]["acp"]["layer_kept_fraction"],
                "curve": curve, "figure": "training_pruning.png"}

    # ------------------------------------------------------------------ 3. parity
    def parity(self) -> dict:
        a, c = self.args, self.cfg
        step_s, overhead = self.step_estimate()
        steps = self.fit_steps(a.parity_steps, 2, 3, step_s, overhead, "parity (3 runs)")
        self.launch.common = self.recipe() + [f"optim.total_tokens={c.optim.total_tokens}",
                                              f"optim.warmup_tokens={c.optim.warmup_tokens}"]
        micro = c.batch.micro_batch
        noise = run_noise_floor(self.launch, c.model.preset, c.data.seq_len, steps, micro, self.work, gpus=a.gpus)
        on = noise["curves"][f"micro{micro}"]
        off = losses_by_step(self.launch.train(
            "parity_acp_off", a.gpus, self.work / "parity_acp_off",
            multi_gpu.run_overrides(c.model.preset, c.data.seq_len, steps, micro) + ["model.overrides.acp=false"]))
        self.launch.common = self.recipe()
        gap = max_loss_gap(on, off)
        return {"steps": steps, "requested_steps": a.parity_steps, "gpus": a.gpus, "micro_batches": noise["micro_batches"],
                "acp_on_vs_off": gap, "noise_floor": noise["gap"],
                "within_noise_floor": gap["max_abs_diff"] <= noise["gap"]["max_abs_diff"],
                "curves": {"acp_on": on, "acp_off": off, f"acp_on_micro{noise['micro_batches'][1]}":
                           noise["curves"][f"micro{noise['micro_batches'][1]}"]}}

    # ------------------------------------------------------------------ 4. analysis, 5. eval
    def loaded(self):
        from foxacp.analysis.loading import load_model, resolve_device, resolve_dtype

        device = resolve_device(self.args.device)
        return load_model(self.work / "train", "trained"), device, resolve_dtype("auto", device)

    def analysis(self) -> dict:
        from foxacp.analysis.outputs import write_analysis
        from foxacp.analysis.pruning import analyze_model

        a, L = self.args, self.cfg.data.seq_len
        loaded, device, dtype = self.loaded()
        lengths = sorted({L, *(2 ** i for i in range(int(math.log2(a.min_analysis_len)),
                                                      int(math.log2(a.max_analysis_len)) + 1))})
        res, arrays = analyze_model(loaded, self.store, seq_len=L, lengths=lengths, num_seqs=a.analysis_windows,
                                    val_fraction=a.val_fraction, device=device, dtype=dtype, log=print)
        figures = write_analysis(res, arrays, self.out / "analysis")
        at = next(r for r in res["savings_vs_length"] if r["length"] == L)
        heads = res["per_head_summary"]
        return {"context": L, "windows": a.analysis_windows,
                "flops_saved_at_context": at["flops_saved_fraction"], "kept_fraction_at_context": at["kept_fraction"],
                "local_rule_flops_saved_at_context": at["local_flops_saved_fraction"],
                "kept_fraction_per_layer": [p["kept_fraction"] for p in at["per_layer"]],
                "heads": heads["heads"], "local_heads": heads["classes"]["local"]["heads"],
                "local_heads_share_of_savings": heads["classes"]["local"]["share_of_savings"],
                "top10_share_of_savings": heads["top10_share_of_savings"],
                "median_head_saved_fraction": heads["median_head_saved_fraction"],
                "savings_vs_length": [{k: r[k] for k in ("length", "flops_saved_fraction", "kept_fraction",
                                                         "local_flops_saved_fraction", "windows", "data",
                                                         "beyond_training_length")}
                                      for r in res["savings_vs_length"]],
                "figures": {k: f"analysis/{v}" for k, v in figures.items()}}

    def eval(self) -> dict:
        from foxacp.analysis.evaluation import run_eval
        from foxacp.analysis.outputs import write_eval

        a = self.args
        loaded, device, dtype = self.loaded()
        res = run_eval([loaded], self.store, seq_len=self.cfg.data.seq_len, num_seqs=a.eval_windows,
                       val_fraction=a.val_fraction, tasks=("loss", "position"), device=device, dtype=dtype, log=print)
        figures = write_eval(res, self.out / "eval")
        parity = res["acp_parity"]["trained"]
        positions = {label: {k: c[k] for k in ("first_quarter_loss", "last_quarter_loss")}
                     for label, c in res["position"].items()}
        return {"windows": res["settings"]["num_seqs"], "data": res["data"], "dtype": res["settings"]["dtype"],
                **{k: parity[k] for k in ("loss_acp_on", "loss_acp_off", "mean_loss_difference",
                                          "max_abs_token_loss_difference", "eps")},
                "position": positions, "figures": {k: f"eval/{v}" for k, v in figures.items()}}

    # ------------------------------------------------------------------ 6. throughput
    def throughput(self) -> dict:
        import torch

        from foxacp.analysis.loading import load_model
        from foxacp.analysis.step_time import attention_share, training_step_time
        from foxacp.data import WindowLoader
        from foxacp.models import FoxForCausalLM, preset_config
        from foxacp.train import distributed

        a, c = self.args, self.cfg
        step_s, _ = self.step_estimate()
        # 3 models x 3 timings (eager with and without attention, compiled), each steps + 1 one-device steps;
        # compilation guessed at a minute per model
        per_step = step_s * a.gpus * c.batch.micro_batch * c.data.seq_len / c.batch.global_tokens
        compile_ = c.run.compile if a.compile is None else a.compile
        steps = self.fit_steps(a.throughput_steps, 2, 9, per_step, 20.0 if compile_ else 0.0, "throughput")
        device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
        loader = WindowLoader(self.store, c.data.seq_len, c.batch.micro_batch, split="train", seed=a.seed,
                              val_fraction=a.val_fraction)
        batches = [b for b, _ in zip(loader, range(steps + 1))]
        bf16 = device.type == "cuda"

        def model(name: str):
            if name == "transformer":
                return FoxForCausalLM(preset_config(a.transformer, vocab_size=self.store.vocab_size,
                                                    bos_token_id=self.store.bos_id, eos_token_id=self.store.eot_id))
            m = load_model(self.work / "train").model
            m.set_acp(name == "fox_acp")
            return m

        rows = {}
        for name in ("fox_acp", "fox_dense", "transformer"):
            m = model(name).to(device)
            row = attention_share(m, batches, device=device, bf16=bf16)
            if compile_:
                distributed.parallelize(m, list(m.model.layers), distributed.DistInfo(device=device), compile=True,
                                        bf16=bf16)
                training_step_time(m, batches[:2], device=device, bf16=bf16)  # compile outside the timing
            row["step_time_s"] = training_step_time(m, batches, device=device, bf16=bf16)
            row["tokens_per_s"] = c.batch.micro_batch * c.data.seq_len / row["step_time_s"]
            rows[name] = row
            del m
        rate = {k: v["tokens_per_s"] for k, v in rows.items()}
        return {"device": "1 GPU" if device.type == "cuda" else "CPU", "steps": steps, "compile": compile_,
                "micro_batch": c.batch.micro_batch, "context": c.data.seq_len, "transformer": a.transformer,
                "rows": rows, "acp_speedup": rate["fox_acp"] / rate["fox_dense"],
                "fox_acp_vs_transformer": rate["fox_acp"] / rate["transformer"],
                "fox_dense_vs_transformer": rate["fox_dense"] / rate["transformer"]}

    # ------------------------------------------------------------------ 7. scaling
    def scaling(self) -> dict:
        a, c = self.args, self.cfg
        counts = sorted({*(2 ** i for i in range(int(math.log2(a.gpus)) + 1)), a.gpus})
        step_s, overhead = self.step_estimate() if self.summary.get("train") else (0.0, 0.0)
        results, skipped = [], []
        mid = max(1, a.scaling_steps // 2)
        for i, preset in enumerate(a.scaling_presets):
            size = 3.0 if "360m" in preset else 1.0  # 360M steps take about 3x the 125M ones
            cost = sum(overhead + a.scaling_steps * step_s * size * a.gpus / n for n in counts)
            if cost > self.deadline.left():
                skipped.append({"preset": preset, "reason": f"needs ~{cost:.0f} s, {self.deadline.left():.0f} s left"})
                continue
            results.append(multi_gpu.run_scaling(self.launch, counts, preset, c.data.seq_len, a.scaling_steps,
                                                 c.batch.micro_batch, a.scaling_warmup, self.work,
                                                 checkpoint_step=mid if i == 0 else None))
            (self.out / "scaling.json").write_text(json.dumps({"scaling": results, "skipped": skipped}, indent=1))
        if not results:
            raise Skip("; ".join(f"{s['preset']}: {s['reason']}" for s in skipped))
        reshard = self.reshard(results[0], mid) if a.gpus > 1 else []
        return {"context": c.data.seq_len, "counts": counts, "scaling": results, "skipped": skipped,
                "reshard": reshard}

    def reshard(self, first: dict, mid: int) -> list[dict]:
        """The most-GPU run of ``first`` resumed from its step-``mid`` checkpoint on 1 and 2 GPUs."""
        a = self.args
        source = self.work / f"scaling_{first['preset']}_{a.gpus}gpu"
        reference = losses_by_step(multi_gpu.read_metrics(source))
        overrides = multi_gpu.run_overrides(first["preset"], first["context"], a.scaling_steps, self.cfg.batch.micro_batch)
        rows = []
        for target in (n for n in (1, 2) if n < a.gpus):
            name = f"reshard_{a.gpus}to{target}"
            curve = losses_by_step(resume_elsewhere(self.launch, name, target, source, mid, self.work, overrides))
            rows.append({"from_gpus": a.gpus, "to_gpus": target, "resumed_from_step": mid,
                         "gap": max_loss_gap(curve, reference)})
        return rows


# ---------------------------------------------------------------------- metrics -> numbers
def pruning_point(record: dict) -> dict:
    """One step's FLOPs pruned: attention (the run's rule, the paper's) and of all training FLOPs."""
    f = record["flops_per_token"]
    return {"step": record["step"], "tokens": record["tokens"], "loss": record["loss"],
            "attention_pruned": 1 - record["acp"]["kept_fraction"],
            "paper_attention_pruned": 1 - record["acp"]["paper_kept_fraction"],
            "total_pruned": f["attention_skipped"] / (f["matmul"] + f["attention_dense"]),
            "tokens_per_s": record["tokens_per_s"]}


def plot_training(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in curve]
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("attention_pruned", "attention FLOPs pruned (run's rule)"),
                       ("paper_attention_pruned", "attention FLOPs pruned (paper rule)"),
                       ("total_pruned", "share of all training FLOPs pruned")):
        ax.plot(steps, [p[key] for p in curve], label=label)
    ax.axhline(0.7, color="grey", linestyle=":", label="paper: about 70%")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    lx.plot(steps, [p["loss"] for p in curve])
    lx.set_xlabel("step")
    lx.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- the report
def pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def report(s: dict) -> str:
    lines = ["# Reproducing the ACP paper with foxacp", "",
             f"Device: {s['device']}. Command: `{s['command']}`. Elapsed: {s.get('elapsed_s', 0):.0f} s.", "",
             "## Stages", "", "| stage | status | seconds | reason |", "|---|---|---|---|"]
    for stage in STAGES:
        st = s["stages"].get(stage, {"status": "not reached"})
        seconds = f"{st['seconds']:.0f}" if "seconds" in st else "-"
        lines.append(f"| {stage} | {st['status']} | {seconds} | {st.get('reason', '')} |")
    lines += ["", "## Corpus", ""]
    if c := s.get("corpus"):
        lines += [f"`{c['source']}` ({c['metadata'].get('corpus', 'store')}; roots: "
                  f"{', '.join(c['metadata'].get('roots', [])) or '-'}), GPT-2 tokens.", "",
                  "| documents | tokens | train docs / tokens | held-out docs / tokens | docs longer than L | "
                  "train tokens in L-windows |", "|---|---|---|---|---|---|",
                  f"| {c['documents']:,} | {c['tokens']:,} | {c['train_documents']:,} / {c['train_tokens']:,} "
                  f"| {c['val_documents']:,} / {c['val_tokens']:,} | {pct(c['share_of_documents_longer_than_context'])} "
                  f"(L={c['context']:,}) | {c['train_tokens_in_windows']:,} |", "", c["windowing"] + "."]
    lines += ["", "## 1. Attention FLOPs pruned over training", ""]
    if t := s.get("train"):
        sched = t["schedule"] or {}
        lines += [f"{t['preset']}, L={t['context']:,}, {t['gpus']} processes, {t['steps']:,} steps x "
                  f"{t['global_tokens']:,} tokens = **{t['tokens']:,} tokens** ({t['epochs']:.2f} passes over the "
                  f"training windows) in a {t['budget_s']:.0f} s budget; cosine planned for "
                  f"{sched.get('planned_steps', '-')} steps, warmup {sched.get('warmup_tokens', '-')} tokens. "
                  f"Median {t['median_tokens_per_s']:,.0f} tokens/s. Final training loss {t['final_loss']:.4f}, "
                  f"held-out {t['val_loss'] if t['val_loss'] is None else round(t['val_loss'], 4)}.", "",
                  "| quantity (last 10% of steps) | foxacp | paper |", "|---|---|---|",
                  f"| attention FLOPs pruned (run's rule) | {pct(t['final_attention_flops_pruned'])} "
                  f"| {PAPER['attention_flops_pruned']} |",
                  f"| attention FLOPs pruned (paper rule) | {pct(t['final_paper_attention_flops_pruned'])} | |",
                  f"| share of all training FLOPs pruned | {pct(t['final_total_flops_pruned'])} | |", "",
                  "Kept fraction per layer at the last step: "
                  + ", ".join(f"{k:.2f}" for k in t["final_layer_kept_fraction"]) + ".", "",
                  f"![pruning over training]({t['figure']})"]
        if t["budget_note"]:
            lines += ["", f"Note: {t['budget_note']}."]
    lines += ["", "## 2. Per-head savings and 3. savings vs context length", ""]
    if an := s.get("analysis"):
        lines += [f"Trained checkpoint, {an['windows']} held-out windows per length, paper rule (local rule beside).", "",
                  "| quantity | foxacp | paper |", "|---|---|---|",
                  f"| attention FLOPs saved at L={an['context']:,} | {pct(an['flops_saved_at_context'])} "
                  f"(local rule {pct(an['local_rule_flops_saved_at_context'])}) | {PAPER['attention_flops_pruned']} |",
                  f"| local heads | {an['local_heads']} of {an['heads']} ({pct(an['local_heads_share_of_savings'])} "
                  f"of the savings) | {PAPER['heads']} |",
                  f"| share of savings from the top 10% of heads | {pct(an['top10_share_of_savings'])} | |",
                  f"| median head saving | {pct(an['median_head_saved_fraction'])} | |", "",
                  "Kept fraction per layer: " + ", ".join(f"{k:.2f}" for k in an["kept_fraction_per_layer"]) + ".", "",
                  "| context | FLOPs saved | kept tiles | local rule saved | windows (data) | paper |",
                  "|---|---|---|---|---|---|"]
        for r in an["savings_vs_length"]:
            beyond = " (beyond training length)" if r["beyond_training_length"] else ""
            lines.append(f"| {r['length']:,}{beyond} | {pct(r['flops_saved_fraction'])} | {pct(r['kept_fraction'])} "
                         f"| {pct(r['local_flops_saved_fraction'])} | {r['windows']} ({r['data']}) "
                         f"| {PAPER['longer_context']} |")
        lines += [""] + [f"![{k}]({v})" for k, v in an["figures"].items()
                         if k.startswith("pattern_") or k in ("savings_vs_length", "head_savings_sorted")]
    lines += ["", "## 4. Loss", ""]
    if e := s.get("eval"):
        lines += [f"Held-out: {e['windows']} windows ({e['data']}), {e['dtype']}.", "",
                  "| quantity | foxacp | paper |", "|---|---|---|",
                  f"| held-out loss, ACP on / off | {e['loss_acp_on']:.5f} / {e['loss_acp_off']:.5f} | {PAPER['loss']} |",
                  f"| mean per-token difference (on - off) | {e['mean_loss_difference']:.2e} | |",
                  f"| largest per-token difference | {e['max_abs_token_loss_difference']:.2e} | |", "",
                  f"![loss by position]({e['figures']['loss_by_position']})"]
    if p := s.get("parity"):
        lines += ["", f"Training-curve parity, first {p['steps']} steps of the same schedule, {p['gpus']} processes:", "",
                  "| comparison | max abs loss difference (step) | final losses |", "|---|---|---|",
                  f"| ACP on vs off | {p['acp_on_vs_off']['max_abs_diff']:.4f} ({p['acp_on_vs_off']['at_step']}) | "
                  f"{p['acp_on_vs_off']['final']['a']:.4f} / {p['acp_on_vs_off']['final']['b']:.4f} |",
                  f"| noise floor: micro-batch {p['micro_batches'][0]} vs {p['micro_batches'][1]}, ACP on "
                  f"| {p['noise_floor']['max_abs_diff']:.4f} ({p['noise_floor']['at_step']}) | "
                  f"{p['noise_floor']['final']['a']:.4f} / {p['noise_floor']['final']['b']:.4f} |", "",
                  f"ACP on vs off {'is' if p['within_noise_floor'] else 'is NOT'} within the noise floor."]
    lines += ["", "## 5. Throughput with learned gates", ""]
    if th := s.get("throughput"):
        lines += [f"Training steps (forward, backward, AdamW) on {th['device']}, micro-batch {th['micro_batch']} x "
                  f"{th['context']:,} tokens, {th['steps']} timed steps after a warm-up, compile {th['compile']}, same "
                  "batches for every model. Attention share: the step time that goes away when only the attention "
                  "core is replaced by a pass-through (eager).", "",
                  "| model | tokens/s | attention share of the step |", "|---|---|---|"]
        for name, r in th["rows"].items():
            label = th["transformer"] + " (SDPA)" if name == "transformer" else name.replace("_", " + ").replace("+ dense", "dense")
            lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {pct(r['attention_share'])} |")
        lines += ["", "| speed-up | foxacp | paper |", "|---|---|---|",
                  f"| FoX + ACP vs FoX dense | {th['acp_speedup']:.3f}x | {PAPER['throughput']} |",
                  f"| FoX + ACP vs Transformer | {th['fox_acp_vs_transformer']:.3f}x | |",
                  f"| FoX dense vs Transformer | {th['fox_dense_vs_transformer']:.3f}x | |"]
    lines += ["", "## 6. Scaling", ""]
    if sc := s.get("scaling"):
        lines += [f"Strong scaling at L={sc['context']:,} (same global batch), from random initialisation.", ""]
        lines += multi_gpu.scaling_table(sc["scaling"])
        lines += [f"\nNot run: {x['preset']} ({x['reason']})." for x in sc["skipped"]]
        for r in sc["reshard"]:
            lines.append(f"\nCheckpoint saved on {r['from_gpus']} GPUs at step {r['resumed_from_step']}, resumed on "
                         f"{r['to_gpus']}: largest loss difference {r['gap']['max_abs_diff']:.4f} over steps "
                         f"{r['gap']['steps'][0]}-{r['gap']['steps'][1]}.")
    lines += ["", "## What differs from the paper", ""] + differences(s)
    return "\n".join(lines) + "\n"


def differences(s: dict) -> list[str]:
    """Generated from what this run actually used."""
    out = []
    if t := s.get("train"):
        out.append(f"- Tokens: {t['tokens']:,} training tokens ({t['tokens'] / 2.7e9:.1%} of the paper's 2.7B for "
                   f"125M); the cosine is compressed into {t['steps']:,} steps, so the gates are much less trained.")
    if c := s.get("corpus"):
        out.append(f"- Data: {c['source']} ({c['tokens']:,} GPT-2 tokens of Python source, "
                   f"{pct(c['share_of_documents_longer_than_context'])} of documents longer than {c['context']:,} "
                   "tokens) instead of LongCrawl64 (natural-language web text); code has different long-range "
                   "structure, so how many heads turn local may differ."
                   + (f" The run saw the training windows {t['epochs']:.2f} times." if (t := s.get("train")) else ""))
    out.append(f"- Hardware: {s['device']}; the paper's throughput numbers come from its own GPUs and kernels.")
    if th := s.get("throughput"):
        out.append(f"- Throughput is timed on {th['device']} without FSDP, after training, on the trained weights; "
                   "the paper times training runs.")
    return out or ["- Nothing ran that could be compared."]


def device_name(args) -> str:
    if args.device == "cuda":
        import torch

        return f"{args.gpus}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores), {args.gpus} gloo processes"


# ---------------------------------------------------------------------- arguments
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="small outputs: JSON, PNG, Markdown")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints and logs (default: a new temporary folder)")
    parser.add_argument("--toy", action="store_true", help="every stage on CPU at toy size (CI): " + ", ".join(
        f"{k}={v}" for k, v in TOY.items() if k != "toy_overrides"))
    parser.add_argument("--gpus", type=int, default=4, help="processes of the training runs (N)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--deadline-min", type=float, default=24.0, help="minutes from start; later stages shrink or skip")
    parser.add_argument("--train-min", type=float, default=13.0, help="wall clock of the training run (minutes)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from " + ",".join(STAGES))
    parser.add_argument("--data", default="python-packages", help="built-in corpus or token store")
    parser.add_argument("--corpus-max-mb", type=float, default=None, help="cap on source MB of a built-in corpus")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="held-out share of documents")
    parser.add_argument("--config", default="fox-pro-125m-16k", help="the training config (shipped name or YAML)")
    parser.add_argument("--transformer", default="transformer-pro-125m", help="baseline preset for throughput")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile per block (default: the config's)")
    parser.add_argument("--parity-steps", type=int, default=200)
    parser.add_argument("--analysis-windows", type=int, default=4, help="held-out windows per analysis length")
    parser.add_argument("--min-analysis-len", type=int, default=1024)
    parser.add_argument("--max-analysis-len", type=int, default=65536)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--throughput-steps", type=int, default=6, help="timed steps per model (after one warm-up)")
    parser.add_argument("--scaling-presets", nargs="+", default=["fox-pro-125m", "fox-pro-360m"])
    parser.add_argument("--scaling-steps", type=int, default=10)
    parser.add_argument("--scaling-warmup", type=int, default=3, help="scaling steps left out of the median")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every training run")
    parser.set_defaults(toy_overrides=[])
    args = parser.parse_args(argv)
    if args.toy:  # the toy values replace the defaults, not what was given
        parser.set_defaults(**TOY)
        args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args) -> None:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)} (choose from {', '.join(STAGES)})")
    args.stages = stages
    checks = [
        (args.gpus >= 1, f"--gpus must be >= 1, got {args.gpus}"),
        (args.deadline_min > 0, f"--deadline-min must be > 0, got {args.deadline_min}"),
        (0 < args.train_min < args.deadline_min,
         f"--train-min must be > 0 and below --deadline-min ({args.deadline_min:g}), got {args.train_min}"),
        (0 < args.val_fraction < 1, f"--val-fraction must be in (0, 1), got {args.val_fraction}"),
        (args.corpus_max_mb is None or args.corpus_max_mb > 0, f"--corpus-max-mb must be > 0, got {args.corpus_max_mb}"),
        (args.parity_steps >= 2, f"--parity-steps must be >= 2, got {args.parity_steps}"),
        (args.analysis_windows >= 1, f"--analysis-windows must be >= 1, got {args.analysis_windows}"),
        (args.eval_windows >= 1, f"--eval-windows must be >= 1, got {args.eval_windows}"),
        (1 <= args.min_analysis_len <= args.max_analysis_len,
         f"--min-analysis-len must be >= 1 and <= --max-analysis-len ({args.max_analysis_len}), got {args.min_analysis_len}"),
        (args.throughput_steps >= 1, f"--throughput-steps must be >= 1, got {args.throughput_steps}"),
        (args.scaling_steps > args.scaling_warmup >= 0,
         f"--scaling-steps ({args.scaling_steps}) must exceed --scaling-warmup ({args.scaling_warmup}) >= 0"),
        (args.work is None or not args.work.exists() or not any(args.work.iterdir()),
         f"--work {args.work} must be a new or empty folder (its runs would be resumed)"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.gpus:
            parser.error(f"--gpus {args.gpus} but {torch.cuda.device_count()} CUDA devices are visible "
                         "(--device cpu runs gloo processes)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is not a folder")


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = Reproduction(args).run()
    print(f"report: {args.out / 'report.md'}")
    failed = [k for k, v in summary["stages"].items() if v["status"] == "failed"]
    if failed:
        raise SystemExit(f"stages failed: {', '.join(failed)} (see {args.out / 'summary.json'})")


if __name__ == "__main__":
    main()
