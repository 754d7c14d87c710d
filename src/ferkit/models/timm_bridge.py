"""`timm:NAME` models: any architecture of timm (PyTorch Image Models) as a ferkit model, built offline.

`create_model("timm:efficientnet_b0", num_classes=7, input_size=64)` (or `--model timm:efficientnet_b0
model_kwargs.input_size=64`) builds timm's architecture with `pretrained=False` (nothing is downloaded), one
input channel (`in_chans=1`: timm makes the stem take grayscale faces) and a `num_classes` head. `input_size` is
the side the faces are resized to before the model sees them (48 px faces are upsampled: 64, 96, 112 ...); CNNs
take any size, architectures with a fixed grid (ViTs and the like, which have a `patch_embed`) are built for it.
The other model_kwargs go to `timm.create_model` (drop_rate=0.2, drop_path_rate=0.1, ...). Weights files record
the name and model_kwargs, so `load_model` rebuilds the model from them like any other.

timm is an optional extra (`pip install 'ferkit[timm]'`). timm imports torchvision at import time for a few
names the architectures do not use (FrozenBatchNorm2d, data transforms). Where torchvision cannot be imported (not
installed, or a wheel built for another torch, as PyPI's CUDA torchvision is next to a CPU-only torch), the
import of timm is given stand-ins for those names, only while timm is imported: each is a placeholder class that
raises, naming torchvision, if it is ever used. `TORCHVISION_STANDIN` says whether that happened.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import types
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any

from torch import nn

PREFIX = "timm:"
INSTALL_HINT = "pip install 'ferkit[timm]'"
DEFAULT_INPUT_SIZE = 48
TORCHVISION_STANDIN = False  # True once timm was imported with the torchvision stand-ins
_timm: types.ModuleType | None = None


class TimmUnavailableError(ImportError):
    """timm is not installed (or cannot be imported); the message says how to install it."""


def is_timm_name(name: str) -> bool:
    return name.startswith(PREFIX)


def import_timm() -> types.ModuleType:
    """The timm module (imported once), or TimmUnavailableError saying how to get it."""
    global _timm, TORCHVISION_STANDIN
    if _timm is not None:
        return _timm
    if importlib.util.find_spec("timm") is None:
        raise TimmUnavailableError(f"timm:NAME models need timm, which is not installed: {INSTALL_HINT}")
    standin = not _torchvision_importable()
    try:
        if standin:
            with _torchvision_standin():
                _timm = importlib.import_module("timm")
        else:
            _timm = importlib.import_module("timm")
    except Exception as e:  # a broken or incompatible install fails in many ways
        raise TimmUnavailableError(f"timm is installed but cannot be imported ({type(e).__name__}: {e}); "
                                   f"reinstall it: {INSTALL_HINT}") from e
    TORCHVISION_STANDIN = standin
    return _timm


def _torchvision_importable() -> bool:
    if "torchvision" in sys.modules and getattr(sys.modules["torchvision"], "_ferkit_standin", False):
        return False
    try:
        importlib.import_module("torchvision.ops.misc")
        return True
    except Exception:  # not installed (ImportError), or built for another torch (RuntimeError, OSError)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # a half-imported package must not shadow the stand-ins
        return False


class _Placeholder(type):
    """Metaclass of the stand-ins: any attribute is another stand-in (`InterpolationMode.BILINEAR`), and making
    one is an error naming torchvision."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"torchvision's {cls.__qualname__} is needed here, but torchvision cannot be imported "
                           "next to this torch; install the torchvision built for it")


def _placeholder(qualname: str) -> type:
    return _Placeholder(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname, "__module__": "torchvision"})


class _StandinModule(types.ModuleType):
    _ferkit_standin = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StandinFinder(MetaPathFinder, Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: ModuleSpec) -> types.ModuleType:
        module = _StandinModule(spec.name)
        module.__path__ = []  # a package: submodules come from this finder too
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _torchvision_standin:
    """While active, `import torchvision...` gives stand-in modules; afterwards they are gone from sys.modules
    (timm keeps the placeholders it imported), so later imports of torchvision behave as before."""

    def __enter__(self) -> None:
        self.finder = _StandinFinder()
        sys.meta_path.insert(0, self.finder)

    def __exit__(self, *exc: Any) -> None:
        sys.meta_path.remove(self.finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            if isinstance(sys.modules[name], _StandinModule):
                del sys.modules[name]


def check_timm_name(arch: str) -> None:
    """ValueError for a name timm does not have (with the closest names it has); timm's hub names (hf-hub:...)
    are refused: they load a configuration from the network."""
    timm = import_timm()
    if ":" in arch or not arch:
        raise ValueError(f"timm model name {arch!r}: give an architecture name (e.g. efficientnet_b0); hub names "
                         "are not supported (ferkit builds the architecture offline)")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `ferkit models 'timm:*' --all` lists them"
        raise ValueError(f"unknown timm model {arch!r}{hint}")


def create_timm_model(arch: str, num_classes: int = 7, input_size: int = DEFAULT_INPUT_SIZE,
                      **kwargs: Any) -> nn.Module:
    """timm's `arch` with pretrained=False, 1 input channel and `num_classes` outputs, for `input_size` faces."""
    timm = import_timm()
    check_timm_name(arch)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or not 8 <= input_size <= 1024:
        raise ValueError(f"input_size {input_size!r}: expected a whole number of pixels (e.g. 48, 64, 96, 112)")
    for fixed in ("pretrained", "in_chans", "num_classes", "pretrained_cfg", "pretrained_cfg_overlay",
                  "checkpoint_path"):
        if fixed in kwargs:
            raise TypeError(f"timm model_kwargs may not set {fixed!r} (ferkit sets it; user weights go in "
                            "init_weights=FILE)")
    build = dict(pretrained=False, in_chans=1, num_classes=num_classes, **kwargs)
    try:
        model = timm.create_model(arch, **build)
        if hasattr(model, "patch_embed") and "img_size" not in kwargs:
            # A fixed token grid (ViT-style): build it for the faces' size.
            model = timm.create_model(arch, img_size=input_size, **build)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ValueError(f"timm cannot build {arch!r} with {kwargs or 'its defaults'}: {e}") from e
    model.ferkit_input_size = input_size  # type: ignore[attr-defined]
    return model


def timm_model_names(pattern: str = "*") -> list[str]:
    """timm's architectures matching `pattern` (shell-style, without the timm: prefix)."""
    return list(import_timm().list_models(pattern))


def timm_source(arch: str) -> str:
    timm = import_timm()
    return (f"timm {timm.__version__} architecture {arch!r} (Wightman, PyTorch Image Models), pretrained=False, "
            "in_chans=1")
