"""Make transformers' Auto classes know ``model_type="foxacp"`` after a plain ``import foxacp``.

Importing :mod:`foxacp.models` registers the classes, but ``import foxacp`` must stay light (no
transformers). So :func:`install` registers at once when transformers' Auto modules are already
loaded, and otherwise puts a finder on ``sys.meta_path`` that imports :mod:`foxacp.models` right
after transformers loads ``configuration_auto`` (``AutoConfig``) or ``modeling_auto``
(``AutoModel*``). The finder only wraps the loaders of those two modules; it finds nothing itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"

_executing: set[str] = set()  # trigger modules whose code is running now


def register() -> None:
    """Import :mod:`foxacp.models` (its import registers the Auto classes). Nothing to do when it
    is imported already, or is being imported (it registers when it finishes)."""
    if "foxacp.models" not in sys.modules:
        importlib.import_module("foxacp.models")


def _loaded(name: str) -> None:
    # modeling_auto imports configuration_auto first: while modeling_auto runs, importing
    # foxacp.models (which needs AutoModel) would be circular, so wait for modeling_auto to finish.
    if name == MODELING_AUTO or MODELING_AUTO not in _executing:
        register()


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs the wrapped loader, then :func:`_loaded`; anything else is the wrapped loader's."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        _executing.add(module.__name__)
        try:
            self.loader.exec_module(module)
        finally:
            _executing.discard(module.__name__)
        _loaded(module.__name__)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _AutoModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the trigger modules through the other finders and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in (CONFIG_AUTO, MODELING_AUTO):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' Auto modules are loaded, else when they load."""
    if CONFIG_AUTO in sys.modules or MODELING_AUTO in sys.modules:
        register()
    elif not any(isinstance(finder, _AutoModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoModuleFinder())
