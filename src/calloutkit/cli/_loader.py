"""Find the server class that ``calloutkit serve TARGET`` should run.

TARGET is a file (``server.py``), a folder holding ``server.py``, or an importable module, each
optionally followed by ``:ClassName``. Without a class name the module must define exactly one
server class of its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from types import ModuleType

from ..runtime._errors import TargetError
from ..runtime._server import BaseServer


def load_target(target: str) -> type[BaseServer]:
    """Return the server class named by TARGET, or raise `TargetError` saying why not.

    >>> load_target("calloutkit.extproc._server:CalloutServer").__name__
    'CalloutServer'
    """
    spec, _, class_name = target.partition(":")
    if not spec:
        raise TargetError(f"target {target!r} names no file or module")
    module = _import(spec)
    if class_name:
        obj = getattr(module, class_name, None)
        if obj is None:
            raise TargetError(f"{spec} has no attribute {class_name!r}")
        if not (inspect.isclass(obj) and issubclass(obj, BaseServer)):
            raise TargetError(f"{spec}:{class_name} is not a calloutkit server class")
        return obj
    found = [obj for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, BaseServer)
             and obj.__module__ == module.__name__ and not inspect.isabstract(obj)]
    if not found:
        raise TargetError(f"{spec} defines no server class (a subclass of CalloutServer, "
                          "NetworkCalloutServer, TykPluginServer, ...)")
    if len(found) > 1:
        names = ", ".join(sorted(c.__name__ for c in found))
        raise TargetError(f"{spec} defines several server classes ({names}); "
                          f"pick one with {spec}:ClassName")
    return found[0]


def _import(spec: str) -> ModuleType:
    path = spec
    if os.path.isdir(path):
        path = os.path.join(path, "server.py")
        if not os.path.isfile(path):
            raise TargetError(f"{spec} is a folder without a server.py")
    if path.endswith(".py") or os.path.sep in path or os.path.isfile(path):
        if not os.path.isfile(path):
            raise TargetError(f"no such file: {path}")
        return _import_file(os.path.abspath(path))
    # Like `python -m`: a module in the current folder is importable, which the console
    # script alone does not give (its sys.path starts with the script's own folder).
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is not None and _names_part_of(spec, exc.name):
            raise TargetError(f"cannot import {spec!r}: {exc}") from None
        raise _import_failed(spec, exc) from None
    except Exception as exc:
        raise _import_failed(spec, exc) from None


def _import_file(path: str) -> ModuleType:
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so the server can import files beside it
    # Name the module after its folder and file, so that two targets never collide and each
    # server logs under a recognisable name (examples/basic/server.py -> basic.server).
    stem = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(folder)
    name = f"{parent}.{stem}" if stem == "server" and parent.isidentifier() else stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) != path:
        name = f"_calloutkit_target_{abs(hash(path))}_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise TargetError(f"{exc.filename or path}:{exc.lineno}: syntax error: {exc.msg}"
                          ) from None
    except Exception as exc:
        sys.modules.pop(name, None)
        raise _import_failed(path, exc) from None
    return module


def _names_part_of(spec: str, missing: str) -> bool:
    """Whether the module that could not be found is ``spec`` itself or a package above it
    (rather than something ``spec``'s own code imports)."""
    return spec == missing or spec.startswith(missing + ".")


def _import_failed(where: str, exc: Exception) -> TargetError:
    """The error for a target whose own code raised while being imported: one line naming
    the target and the error, and the traceback of the user's frames alone (calloutkit's and
    importlib's frames say nothing about what to fix)."""
    error = TargetError(f"cannot import {where}: {type(exc).__name__}: {exc}")
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not _is_machinery(frame.filename)]
    if frames:
        error.user_traceback = "Traceback (most recent call last):\n" + "".join(
            traceback.format_list(frames))
    return error


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_IMPORTLIB = os.path.dirname(os.path.abspath(importlib.__file__))


def _is_machinery(filename: str) -> bool:
    if filename.startswith("<frozen importlib"):
        return True
    path = os.path.abspath(filename)
    return any(path == root or path.startswith(root + os.sep) for root in (_PACKAGE, _IMPORTLIB))
