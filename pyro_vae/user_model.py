r"""Your own Pyro model in a run: ``pyro-vae train --model FILE.py:CLASS [--model-kwargs JSON]``.

The class is a ``torch.nn.Module`` with two Pyro programs (the protocol of docs/own-model.md):

* ``model(x=None, batch_size=None)``: p(z) p_theta(x|z), every per-point site inside one data plate of size
  ``len(x)`` (or ``batch_size`` when ``x`` is None: then the model *generates* the observed site);
* ``guide(x)``: q_phi(z|x), the same latent sites inside the same plate.

It is built as ``CLASS(**kwargs)``, plus ``input_shape=`` (the dataset's) when its ``__init__`` takes that
argument. A run stores the file's source as ``RUN_DIR/model.py`` with its sha256 in ``config.json``
(``user_model``: ``spec``, ``class``, ``kwargs``, ``sha256``, ``input_shape``), and every later command loads the
class from that copy, so a run reloads after the original file is edited or deleted.

**Code in a run is code that runs.** Loading such a run executes ``model.py``, so it needs consent:
``--trust-code`` on the command line, ``trust_code=True`` in Python (like ``trust_remote_code`` of the Hugging
Face libraries); :func:`check_trust` refuses otherwise, in one line naming the file and the flag. Runs of the
built-in models hold no code and need nothing. Checkpoints stay tensors only (``weights_only=True``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from .data import atomic_write_bytes

__all__ = ["MODEL_SOURCE", "UntrustedCodeError", "parse_spec", "read_source", "load_class", "build",
           "user_model_record", "copy_into_run", "check_trust", "load_from_run"]

#: the copy of the model's source inside a run directory
MODEL_SOURCE = "model.py"


class UntrustedCodeError(ValueError):
    """Loading a run would execute its model code, and no consent (``trust_code``) was given."""


# ---------------------------------------------------------------------------------------------- the spec
def parse_spec(spec: str) -> tuple[Path, str]:
    """``"path/to/file.py:ClassName"`` -> (path, class name); a missing file or a malformed spec is a ValueError."""
    path, sep, name = str(spec).rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ValueError(f"--model takes FILE.py:CLASS (e.g. examples/own_model.py:TutorialVAE), got {spec!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--model: no such file {path}")
    return path, name


def read_source(path) -> bytes:
    """The file's bytes (what is stored in the run and hashed)."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None


def sha256(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()


# ---------------------------------------------------------------------------------------------- loading
def _exec_file(path: Path, digest: str):
    """Execute the file as a module named after its hash (``importlib.util.spec_from_file_location``), so two
    runs' copies never share a module and ``sys.modules`` holds it (dataclasses, pickling and torch.compile
    look modules up there)."""
    name = f"pyro_vae_user_model_{digest[:16]}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path} as Python source (name it *.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        raise ValueError(f"cannot load {path}: {type(e).__name__}: {_one_line(e)}{where}") from None
    return module


def _one_line(e: BaseException) -> str:
    text = str(getattr(e, "msg", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_class(path, name: str, digest: str | None = None) -> type:
    """The class ``name`` of the file ``path``: an ``nn.Module`` subclass with ``model`` and ``guide`` methods."""
    path = Path(path)
    module = _exec_file(path, digest or sha256(read_source(path)))
    cls = getattr(module, name, None)
    if cls is None:
        found = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
                       and v.__module__ == module.__name__)
        raise ValueError(f"{path} has no class {name}" + (f" (it defines {', '.join(found)})" if found else ""))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path}:{name} is not a torch.nn.Module class")
    missing = [m for m in ("model", "guide") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"{path}:{name} has no {' and no '.join(missing)} method: --model takes a module with Pyro "
                         "programs model(x=None, batch_size=None) and guide(x) (docs/own-model.md)")
    return cls


def build(cls: type, kwargs: dict, input_shape=None) -> nn.Module:
    """``cls(**kwargs)``, plus ``input_shape=`` when ``__init__`` takes it and ``kwargs`` do not give it.

    Keyword arguments the class does not take are a one-line ValueError naming them and what it takes."""
    kwargs = dict(kwargs)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if "input_shape" in named and "input_shape" not in kwargs and input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    unknown = sorted(set(kwargs) - set(named)) if not takes_any else []
    if unknown:
        takes = f"it takes {', '.join(named)}" if named else "it takes no arguments"
        raise ValueError(f"--model-kwargs: {cls.__name__} does not take {', '.join(unknown)} ({takes})")
    try:
        module = cls(**kwargs)
    except Exception as e:
        raise ValueError(f"{cls.__name__}(**{kwargs}) failed: {type(e).__name__}: {_one_line(e)}") from None
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{cls.__name__} has no trainable parameters (training optimizes module.parameters())")
    return module


# ---------------------------------------------------------------------------------------------- runs
def user_model_record(spec: str, kwargs: dict | None = None) -> tuple[dict, bytes]:
    """Check ``spec`` and read its source: (the ``config.json`` record without ``input_shape``, the source bytes).
    Nothing is executed yet."""
    path, name = parse_spec(spec)
    source = read_source(path)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {kwargs!r}")
    return {"spec": str(spec), "class": name, "kwargs": dict(kwargs or {}), "sha256": sha256(source)}, source


def copy_into_run(run_dir, source: bytes) -> Path:
    """Write the model's source into the run (atomically) as ``MODEL_SOURCE``."""
    path = Path(run_dir) / MODEL_SOURCE
    atomic_write_bytes(path, source)
    return path


def check_trust(run_dir, record: dict | None, trust_code: bool) -> None:
    """Refuse (:class:`UntrustedCodeError`, one line naming the file and the flag) to load a run holding model
    code without consent. Runs of the built-in models (``record`` None) pass."""
    if record and not trust_code:
        raise UntrustedCodeError(
            f"{Path(run_dir) / MODEL_SOURCE} is model code ({record.get('class')}) that loading this run would run: "
            "pass --trust-code if you trust it (trust_code=True in Python)")


def load_from_run(run_dir, record: dict, trust_code: bool = False) -> type:
    """The class stored in the run, after :func:`check_trust` and a check of the copy's sha256."""
    check_trust(run_dir, record, trust_code)
    _check_record(record)
    path = Path(run_dir) / MODEL_SOURCE
    if not path.is_file():
        raise ValueError(f"{path} is missing: this run's model code is gone, so the run cannot be loaded")
    digest = sha256(read_source(path))
    if digest != record["sha256"]:
        raise ValueError(f"{path} was changed after training (sha256 {digest[:12]}..., config.json says "
                         f"{record['sha256'][:12]}...): restore it or retrain")
    return load_class(path, record["class"], digest)


def _check_record(record: dict) -> None:
    kinds = {"spec": str, "class": str, "kwargs": dict, "sha256": str}
    bad = [k for k, t in kinds.items() if not isinstance(record.get(k), t)]
    if bad:
        raise ValueError(f"config.json: user_model lacks a valid {', '.join(bad)}")
