"""The ``foxacp`` command: bad input gets one ``foxacp: error:`` line naming the key and what it
accepts (exit 2, no traceback unless --debug / FOXACP_DEBUG); --resume, --auto-resume and
overrides after options; --help without torch; --version; configs by name; generate RUN_DIR."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from foxacp.cli import main
from foxacp.train import checkpoint
from foxacp.train.config import RunSection, load_config

from conftest import write_byte_store

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))


def _error(capsys, argv) -> str:
    """Run ``foxacp argv``; assert exit code 2 and one error line without traceback; return the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("foxacp: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override, expected", [
    ("run.max_steps=-5", "run.max_steps must be >= 1 or null"),
    ("run.max_steps=0", "run.max_steps must be >= 1 or null"),
    ("run.log_every=0", "run.log_every must be >= 1"),
    ("run.ckpt_every=-1", "run.ckpt_every must be >= 0"),
    ("run.eval_every=-3", "run.eval_every must be >= 0"),
    ("run.tensorboard=maybe", "run.tensorboard must be true or false (also 1/0, yes/no), got 'maybe'"),
    ("data.seq_len=128.7", "data.seq_len must be a whole number, got 128.7"),
    ("model.overrides.acpp=true", "unknown key model.overrides.acpp; did you mean model.overrides.acp?"),
    ("model.overrides.hiden_size=32", "did you mean model.overrides.hidden_size?"),
    ("model.overrides.acp=flase", "model.overrides.acp must be true or false"),
    ("run.max_step=3", "unknown key run.max_step; did you mean run.max_steps?"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("model.preset=fox-pro-tny", "did you mean fox-pro-tiny?"),
    ("run.out_dir=[a", "override 'run.out_dir=[a' is not valid YAML"),
])
def test_bad_override_names_key_and_accepted_values(capsys, override, expected):
    assert expected in _error(capsys, ["train", override])


def test_sections_validate_on_construction():
    with pytest.raises(ValueError, match="run.log_every must be >= 1"):
        RunSection(log_every=0)
    cfg = load_config(None, ["model.overrides.acp=yes", "run.tensorboard=0", "data.seq_len=128.0",
                             "batch.global_tokens=1.024e3"])
    assert cfg.model.overrides["acp"] is True and cfg.run.tensorboard is False
    assert cfg.data.seq_len == 128 and isinstance(cfg.data.seq_len, int) and cfg.batch.global_tokens == 1024


def test_every_model_override_is_type_checked():
    import inspect

    from foxacp.models import FoxConfig

    names = [p for p in inspect.signature(FoxConfig.__init__).parameters if p not in ("self", "kwargs")]
    assert "acp" in names and len(names) > 20
    for name in names:
        with pytest.raises(ValueError, match=f"model.overrides.{name} must be "):
            load_config(None, [f"model.overrides.{name}=[1, 2]"])


def test_fox_config_rejects_text_booleans():
    from foxacp.models import FoxConfig

    with pytest.raises(ValueError, match="acp must be true or false, got 'flase'"):
        FoxConfig(acp="flase")


def test_config_by_shipped_name(capsys):
    cfg = load_config("fox-pro-125m-16k")
    assert cfg.data.seq_len == 16384 and cfg.model.preset == "fox-pro-125m"
    assert "did you mean fox-pro-125m-16k?" in _error(capsys, ["train", "--config", "fox-pro-125m-16x"])


def test_bad_generate_arguments(capsys):
    assert "--prompt-ids" in _error(capsys, ["generate", "fox-pro-tiny", "--prompt-ids", "1,x", "--device", "cpu"])
    assert "no such model folder" in _error(capsys, ["generate", "/nonexistent/model"])
    assert "--top-p must be in (0, 1], got 0.0" in _error(capsys, ["generate", "fox-pro-tiny", "--top-p", "0"])
    assert "--steps must be >= 1" in _error(capsys, ["demo", "--steps", "-2"])


def test_unknown_command_and_option(capsys):
    for argv in (["trian"], ["train", "--bogus"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "foxacp: error:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return write_byte_store(tmp_path_factory.mktemp("corpus"), n_docs=6, words_per_doc=200)


def _train_args(store_dir, out_dir) -> list[str]:
    return ["data.seq_len=64", f"data.source={store_dir}", "data.val_fraction=0.2", "batch.global_tokens=128",
            "batch.micro_batch=2", "optim.total_tokens=1280", f"run.out_dir={out_dir}", "run.progress=false",
            "run.tensorboard=false", "run.eval_batches=1"]


def test_resume_needs_a_checkpoint_auto_resume_does_not(capsys, store_dir, tmp_path):
    run = tmp_path / "run"
    message = _error(capsys, ["train", "--resume", *_train_args(store_dir, run)])
    assert "no checkpoint to resume from" in message and "--auto-resume" in message
    # options between overrides are fine: the words after --auto-resume / --resume still apply
    assert main(["train", *_train_args(store_dir, run), "--auto-resume", "run.max_steps=1"]) == 0
    assert checkpoint.latest(run).name == "step_00000001"
    assert main(["train", *_train_args(store_dir, run), "--resume", "run.max_steps=2"]) == 0
    assert checkpoint.latest(run).name == "step_00000002"
    # a run folder (it has a config.json of its own) generates like an exported folder
    assert main(["generate", str(run), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "\n1,2," in capsys.readouterr().out


def test_traceback_only_with_debug():
    argv = [sys.executable, "-m", "foxacp", "train", "--config", "no-such-config"]
    plain = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("foxacp: error: config 'no-such-config'"), plain.stderr
    debug = subprocess.run(argv, env={**ENV, "FOXACP_DEBUG": "1"}, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_help_and_version_do_not_import_torch():
    code = ("import sys, contextlib, io; from foxacp.cli import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "    print(out.getvalue())\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from foxacp import __version__

    assert "generate" in done.stdout and f"foxacp {__version__}" in done.stdout
