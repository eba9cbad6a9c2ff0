"""`foxacp analyze` / `foxacp eval` on a tiny FoX (Pro) trained a few steps: figures, JSON vs report,
per-head savings adding up, the ACP bound holding, ACP on/off parity, the needle generator."""

import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from foxacp.cli import main
from foxacp.data import get_tokenizer
from foxacp.train.config import load_config
from foxacp.train.trainer import Trainer

from conftest import write_byte_store

SEQ_LEN = 256


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return write_byte_store(tmp_path_factory.mktemp("corpus"), n_docs=10, words_per_doc=450)


@pytest.fixture(scope="module")
def run_dir(store_dir, tmp_path_factory):
    """Three training steps of fox-pro-tiny with spread gates (decay 2..64 tokens) and ACP on."""
    out = tmp_path_factory.mktemp("run")
    overrides = {
        "data.source": store_dir, "data.seq_len": SEQ_LEN, "data.val_fraction": 0.2, "model.preset": "fox-pro-tiny",
        "model.overrides.acp": True, "model.overrides.fgate_bias_init": "spread",
        "model.overrides.fgate_min_decay": 2, "model.overrides.fgate_max_decay": 64,
        "batch.global_tokens": 2 * SEQ_LEN, "batch.micro_batch": 2, "optim.warmup_tokens": 512,
        "optim.total_tokens": 3 * 2 * SEQ_LEN, "optim.lr": 0.003, "run.out_dir": out, "run.log_every": 1,
        "run.progress": False, "run.tensorboard": False, "run.eval_batches": 1,
    }
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return out


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    assert main(["export", str(run_dir), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def analysis(run_dir, store_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    assert main(["analyze", str(run_dir), "--data", str(store_dir), "--out", str(out), "--lengths", "128", "512",
                 "--num-seqs", "2"]) == 0
    return out, json.loads((out / "analysis.json").read_text())


def test_analyze_writes_every_figure(analysis):
    out, res = analysis
    assert res["settings"]["seq_len"] == SEQ_LEN  # taken from the training run
    assert [r["length"] for r in res["savings_vs_length"]] == [128, 256, 512]
    figures = res["figures"]
    assert {"head_savings_sorted", "head_savings_hist", "savings_vs_length", "gate_decay_lengths",
            "thresholds"} <= set(figures)
    assert sum(k.startswith("pattern_") for k in figures) == len(res["patterns"]) >= 2
    report = (out / "report.md").read_text()
    for name in figures.values():
        assert (out / name).stat().st_size > 1000, name
        assert f"({name})" in report
    assert (out / "patterns.npz").stat().st_size > 0


def test_analyze_report_matches_json(analysis):
    out, res = analysis
    report = (out / "report.md").read_text()
    for r in res["savings_vs_length"]:
        row = re.search(rf"^\| {r['length']} \| .*? \| ([0-9.]+) \| ([0-9.]+)% \|", report, re.M)
        assert row, r["length"]
        assert float(row.group(1)) == pytest.approx(r["kept_fraction"], abs=6e-4)
        assert float(row.group(2)) == pytest.approx(100 * r["flops_saved_fraction"], abs=0.06)
    hs = res["per_head_summary"]
    top = re.search(r"top 10% of heads \((\d+) of (\d+)\) provide ([0-9.]+)%", report)
    assert int(top.group(1)) == hs["top10_heads"] and int(top.group(2)) == hs["heads"] == 8
    assert float(top.group(3)) == pytest.approx(100 * hs["top10_share_of_savings"], abs=0.06)
    for t in res["thresholds"]:
        row = re.search(rf"^\| {t['layer']} \| (-?[0-9.]+)\.\.", report, re.M)
        assert float(row.group(1)) == pytest.approx(min(t["delta"]), abs=6e-3)


def test_per_head_savings_add_up(analysis):
    _, res = analysis
    at = next(r for r in res["savings_vs_length"] if r["length"] == SEQ_LEN)
    heads = res["per_head"]
    saved = sum(h["flops_saved"] for h in heads)
    dense = sum(h["flops_dense"] for h in heads)
    assert dense == pytest.approx(at["flops_dense"])
    assert saved == pytest.approx(at["flops_dense"] - at["flops_done"])
    assert saved / dense == pytest.approx(at["flops_saved_fraction"])
    assert res["per_head_summary"]["flops_saved_fraction"] == pytest.approx(at["flops_saved_fraction"])
    ranked = sorted((h["flops_saved"] for h in heads), reverse=True)
    n_top = res["per_head_summary"]["top10_heads"]
    assert res["per_head_summary"]["top10_share_of_savings"] == pytest.approx(sum(ranked[:n_top]) / saved)
    # spread gates (decay 2..64 tokens): ACP prunes, more at longer contexts
    by_len = {r["length"]: r["flops_saved_fraction"] for r in res["savings_vs_length"]}
    assert 0 < by_len[SEQ_LEN] < by_len[512] < 1
    assert {h["class"] for h in heads} == {"local", "global"}


def test_thresholds_bound_holds(analysis):
    """The bound U the threshold assumes is >= the Cauchy-Schwarz bound >= the largest actual logit;
    the tight threshold prunes at least as much; the recomputed plan matches the forward's."""
    _, res = analysis
    at = next(r for r in res["savings_vs_length"] if r["length"] == SEQ_LEN)
    for t, layer in zip(res["thresholds"], at["per_layer"]):
        for u, cs, actual in zip(t["bound_U"], t["cauchy_schwarz_bound"], t["max_abs_logit"]):
            assert u >= cs - 1e-4 and cs >= actual - 1e-4 and actual > 0
        assert t["kept_fraction"] == pytest.approx(layer["kept_fraction"])
        assert t["kept_fraction_tight_bound"] <= t["kept_fraction"] + 1e-12
    for g in res["gates"]:
        assert g["mean_log_f"] < 0 and g["decay_length"] == pytest.approx(-1 / g["mean_log_f"])
        assert g["decay_length_p10"] <= g["decay_length_p50"] <= g["decay_length_p90"]


def test_analyze_reports_both_rules(analysis):
    """Both ACP rules side by side from the same forwards: the local rule keeps a subset of the paper
    rule's tiles (overall, per layer, per head, per pattern) and the report shows both."""
    out, res = analysis
    assert res["settings"]["acp_rules"] == ["paper", "local"]
    report = (out / "report.md").read_text()
    for r in res["savings_vs_length"]:
        assert 0 < r["local_kept_fraction"] <= r["kept_fraction"] + 1e-12
        assert r["local_flops_saved_fraction"] >= r["flops_saved_fraction"] - 1e-12
        assert r["local_flops_done"] <= r["flops_done"]
        assert r["local_to_paper_kept"] <= 1 + 1e-12
        assert r["local_kept_fraction"] == pytest.approx(r["local_to_paper_kept"] * r["kept_fraction"])
        for layer in r["per_layer"]:
            assert layer["local_kept_fraction"] <= layer["kept_fraction"] + 1e-12
            assert layer["local_flops_saved_fraction"] >= layer["flops_saved_fraction"] - 1e-12
        row = re.search(rf"^\| {r['length']} \| .*? \| [0-9.]+% \| ([0-9.]+) \| ([0-9.]+)% \| ([0-9.]+) \|", report, re.M)
        assert row, r["length"]
        assert float(row.group(1)) == pytest.approx(r["local_kept_fraction"], abs=6e-4)
        assert float(row.group(2)) == pytest.approx(100 * r["local_flops_saved_fraction"], abs=0.06)
        assert float(row.group(3)) == pytest.approx(r["local_to_paper_kept"], abs=6e-4)
    longest = res["savings_vs_length"][-1]  # spread gates at 2x the training length: the local rule prunes more
    assert longest["local_kept_fraction"] < longest["kept_fraction"]
    at = next(r for r in res["savings_vs_length"] if r["length"] == SEQ_LEN)
    heads = res["per_head"]
    for h in heads:
        assert h["local_kept_fraction"] <= h["kept_fraction"] + 1e-12
        assert h["local_flops_saved"] >= h["flops_saved"] and h["local_saved_fraction"] >= h["saved_fraction"] - 1e-12
    local_saved = sum(h["local_flops_saved"] for h in heads)
    assert local_saved == pytest.approx(at["flops_dense"] - at["local_flops_done"])
    assert res["per_head_summary"]["local_flops_saved_fraction"] == pytest.approx(at["local_flops_saved_fraction"])
    for t, layer in zip(res["thresholds"], at["per_layer"]):
        assert t["local_kept_fraction"] == pytest.approx(layer["local_kept_fraction"])
    for p in res["patterns"]:
        assert p["local_kept_tiles"] <= p["kept_tiles"] and p["local_pruned_tiles"] >= p["pruned_tiles"]
        assert p["local_last_row_kept_span_tokens"] <= p["last_row_kept_span_tokens"]
    arrays = np.load(out / "patterns.npz")
    for p in res["patterns"]:
        paper, local = arrays[f"tiles_{p['key']}"], arrays[f"local_tiles_{p['key']}"]
        assert ((local == 2) <= (paper == 2)).all() and ((local > 0) == (paper > 0)).all()
        assert int((local == 2).sum()) == p["local_kept_tiles"] and int((paper == 2).sum()) == p["kept_tiles"]
    assert "kept fraction, local" in report and "local rule" in report


def test_local_rule_run_keeps_paper_counts(run_dir, store_dir):
    """The analysis runs under the local rule; the paper counts its stats carry are what a run under
    the paper rule computes on the same window, and analyze_model puts the model's rule back."""
    from foxacp.analysis.loading import heldout_windows, load_model, open_data
    from foxacp.analysis.pruning import analyze_model

    loaded = load_model(run_dir)
    model = loaded.model.eval()
    ids = heldout_windows(open_data(str(store_dir), loaded.tokenizer), 512, 1, 0.2).input_ids[:1]
    model.collect_acp_stats(True)
    counts = {}
    with torch.no_grad():
        for rule in ("paper", "local"):
            model.set_acp(True, rule=rule)
            model.model(input_ids=ids, use_cache=False)
            counts[rule] = [(s.kept_tiles.tolist(), s.paper_kept_tiles.tolist()) for s in model.acp_stats()]
    assert [p for _, p in counts["local"]] == [k for k, _ in counts["paper"]]
    model.set_acp(False, rule="paper")
    analyze_model(loaded, open_data(str(store_dir), loaded.tokenizer), seq_len=128, lengths=[128], num_seqs=1,
                  val_fraction=0.2, log=lambda *_: None)
    assert not model.config.acp and model.config.acp_rule == "paper"


@pytest.fixture(scope="module")
def evaluation(run_dir, hf_dir, store_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", str(run_dir), str(hf_dir), "--names", "ckpt", "hf", "--data", str(store_dir), "--out",
                 str(out), "--num-seqs", "2", "--needle-lengths", "128", "256", "--needle-depths", "0", "0.5", "1",
                 "--needle-trials", "1", "--decode-tokens", "4", "--repeats", "1", "--throughput-len", "64"]) == 0
    return out, json.loads((out / "eval.json").read_text())


def test_eval_acp_parity_and_report(evaluation):
    out, res = evaluation
    assert res["settings"]["seq_len"] == SEQ_LEN
    assert len(res["loss"]) == 4  # two models x ACP on/off
    for name, p in res["acp_parity"].items():
        # at most eps = e^-10 of attention mass moves per layer; the loss barely moves
        assert p["max_abs_token_loss_difference"] <= 1e-3, name
        assert abs(p["loss_acp_on"] - p["loss_acp_off"]) <= 1e-4
    # the checkpoint and its export are the same model on the same tokens
    ckpt, hf = res["acp_parity"]["ckpt"], res["acp_parity"]["hf"]
    assert ckpt["loss_acp_off"] == pytest.approx(hf["loss_acp_off"], abs=1e-6)
    report = (out / "report.md").read_text()
    for v in res["loss"]:
        row = re.search(rf"^\| {v['model']} \| {v['acp']} \| ([0-9.]+) \| ([0-9.]+) \|", report, re.M)
        assert float(row.group(1)) == pytest.approx(v["loss"], abs=6e-5)
        assert float(row.group(2)) == pytest.approx(v["perplexity"], rel=1e-3)
    for name in res["figures"].values():
        assert (out / name).stat().st_size > 1000, name
        assert f"({name})" in report
    assert len(res["needle"]) == 4 and len(res["throughput"]) == 6  # ACP on/off + eviction, per model
    for grid in res["needle"].values():
        assert len(grid["accuracy"]) == 2 and len(grid["accuracy"][0]) == 3
    for t in res["throughput"]:
        assert t["prefill_tokens_per_s"] > 0 and t["decode_tokens_per_s"] > 0
    curve = next(iter(res["position"].values()))
    assert len(curve["smoothed"]) == SEQ_LEN


def test_eval_throughput_reports_acp_eviction(evaluation):
    """FoX Pro models get a decode row through the ACP eviction cache beside the full cache; a
    direct call evicts (spread gates, evict_every=64 < the prompt) and keeps less memory."""
    from foxacp.analysis.evaluation import can_evict, throughput
    from foxacp.models import FoxForCausalLM, preset_config

    out, res = evaluation
    for name in ("ckpt", "hf"):
        rows = {r["acp"]: r for r in res["throughput"] if r["model"] == name}
        assert set(rows) == {"on", "off", "evict"} and rows["evict"]["label"] == f"{name} ACP evict"
        assert rows["evict"]["cache"] == "evict" and rows["on"]["cache"] == "full"
        assert rows["evict"]["decode_tokens_per_s"] > 0 and 0 < rows["evict"]["kept_key_fraction"] <= 1
        assert 0 < rows["evict"]["cache_bytes"] <= rows["off"]["cache_bytes"]
    assert "| hf ACP evict | 64 |" in (out / "report.md").read_text()
    model = FoxForCausalLM(preset_config("fox-pro-tiny", vocab_size=97, fgate_bias_init="spread",
                                         fgate_min_decay=2.0, fgate_max_decay=16.0)).eval()
    kwargs = dict(prompt_len=80, decode_tokens=2, batch=1, vocab=97, device="cpu", repeats=1)
    full, evict = throughput(model, **kwargs), throughput(model, **kwargs, evict=True)
    assert evict["cache"] == "evict" and evict["decode_tokens_per_s"] > 0
    assert evict["kept_key_fraction"] < 1 and evict["cache_bytes"] < full["cache_bytes"]
    llama = FoxForCausalLM(preset_config("fox-llama-tiny", vocab_size=97))
    assert not can_evict(llama)
    with pytest.raises(ValueError, match="QK-norm"):
        throughput(llama, **kwargs, evict=True)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_goes_where_it_says(depth):
    from foxacp.analysis.evaluation import make_needle_prompt, score_answer

    tok = get_tokenizer("bytes")
    hay = list(b"lorem ipsum dolor sit amet " * 40)
    p = make_needle_prompt(tok, hay, 300, depth, random.Random(1))
    assert len(p.input_ids) == 300 and p.input_ids[0] == tok.bos_id
    assert p.input_ids[p.needle_start:p.needle_start + len(p.needle_ids)] == p.needle_ids
    assert tok.decode(p.needle_ids) == f" The secret number of {p.name} is {p.answer}. "
    hay_len = 300 - 1 - len(p.needle_ids) - len(tok.encode(f" What is the secret number of {p.name}? "
                                                          f"The secret number of {p.name} is"))
    assert p.needle_start - 1 == round(depth * hay_len)
    assert p.input_ids[1:p.needle_start] == hay[:p.needle_start - 1]  # haystack order is kept
    assert tok.decode(p.input_ids).endswith(f"The secret number of {p.name} is")
    assert score_answer(f" {p.answer}.", p.answer) and not score_answer(f" {p.answer}7", p.answer)
    assert not score_answer(" none", p.answer)


def test_needle_is_answerable_by_a_copying_model():
    """Exact match works end to end: a 'model' that copies the number after the needle scores 1."""
    from foxacp.analysis import evaluation as E

    tok = get_tokenizer("bytes")
    p = E.make_needle_prompt(tok, list(b"abc " * 100), 200, 0.5, random.Random(3))
    text = tok.decode(p.input_ids)
    answer = re.search(rf"secret number of {p.name} is (\d+)\.", text).group(1)
    assert E.score_answer(" " + answer, p.answer)


def test_moving_average_and_position_curve():
    from foxacp.analysis.evaluation import moving_average, position_curve

    x = torch.arange(10, dtype=torch.float64).numpy()
    assert moving_average(x, 1).tolist() == x.tolist()
    assert moving_average(x, 3).tolist()[:4] == [0.0, 0.5, 1.0, 2.0]
    losses = torch.tensor([[1.0, 2.0, float("nan"), 4.0], [3.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    curve = position_curve(losses, 2)
    assert curve["mean"] == [2.0, 2.0, 2.0, 2.0]


def test_hf_tokenizer_bytes_matches_foxacp():
    from foxacp.models.hf_tokenizer import hf_tokenizer

    text = "héllo wörld\n\tx"
    tok = hf_tokenizer("bytes")
    assert tok.encode(text, add_special_tokens=False) == get_tokenizer("bytes").encode(text)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token_id == 256


def test_commands_module_imports_light():
    code = ("import sys, foxacp.analysis.commands; "
            "bad = [m for m in ('matplotlib', 'transformers', 'foxacp.models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_analyze_rejects_transformer(tmp_path, store_dir, capsys):
    from foxacp.models import FoxForCausalLM, preset_config

    FoxForCausalLM(preset_config("transformer-pro-tiny", vocab_size=257)).save_pretrained(tmp_path / "tf")
    assert main(["analyze", str(tmp_path / "tf"), "--data", str(store_dir), "--out", str(tmp_path / "o"),
                 "--seq-len", "128", "--lengths", "128", "--num-seqs", "1"]) == 2
    assert "needs a FoX model" in capsys.readouterr().err
