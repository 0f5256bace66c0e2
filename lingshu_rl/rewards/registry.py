"""Built-in reward names and the resolver that turns a ``--reward`` reference into a function.

Resolution order for a reference ``REF`` (the first that applies wins):
1. a built-in name (``mcq_exact``, ``format``, ``answer_norm``, ...);
2. an installed entry point named ``REF`` in the group ``lingshu_rl.rewards``;
3. ``package.module:function`` (importable module);
4. ``path/to/file.py:function`` (a Python file on disk).
A function written for verl (``compute_score(data_source, solution_str, ground_truth, extra_info)``) or for
TRL (``f(prompts, completions, **columns)``) is recognised by its signature and adapted.
"""

from __future__ import annotations

import hashlib
import importlib
import linecache
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

from lingshu_rl.rewards.base import RewardFn

ENTRY_POINT_GROUP = "lingshu_rl.rewards"
_BUILTINS: dict[str, RewardFn] = {}
# Rewards loaded from a file live in a module of a made-up name; scoring workers load the same files under the
# same names first, so a reward is pickled by reference and its tracebacks name the user's file and line. The
# source text travels with the path: a scorer on another Ray node needs no copy of the file.
_USER_FILES: dict[str, tuple[str, str]] = {}  # module name -> (path, source)


class RewardResolutionError(LookupError):
    """A ``--reward`` reference that matched nothing; the message lists every attempt."""


def register(name: str):
    """Decorator: register a function as a built-in reward under ``name``."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _BUILTINS and _BUILTINS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        _BUILTINS[name] = fn
        return fn

    return wrap


def builtin_rewards() -> dict[str, RewardFn]:
    import lingshu_rl.rewards  # noqa: F401  (importing the package registers the built-ins)

    return dict(_BUILTINS)


def _from_entry_point(ref: str) -> RewardFn | None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == ref:
            return ep.load()
    return None


def _from_module(ref: str) -> RewardFn:
    module_name, _, attr = ref.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def _load_source_module(module_name: str, path: str, source: str) -> ModuleType:
    """A module run from ``source`` under the file name ``path`` (its tracebacks name the user's file and line,
    shown even where that file does not exist)."""
    module = ModuleType(module_name)
    module.__file__ = path
    sys.modules[module_name] = module
    linecache.cache[path] = (len(source), None, source.splitlines(keepends=True), path)
    try:
        exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102  (the user's own reward file)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _from_file(ref: str) -> RewardFn:
    path_str, _, attr = ref.rpartition(":")
    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    module_name = "lingshu_rl_user_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if module_name not in sys.modules:
        _USER_FILES[module_name] = (str(path), path.read_text())
        _load_source_module(module_name, *_USER_FILES[module_name])
    return getattr(sys.modules[module_name], attr)


def user_reward_files() -> dict[str, tuple[str, str]]:
    """Module name -> (path, source) of every reward file loaded in this process (for
    :func:`load_user_reward_files`)."""
    return dict(_USER_FILES)


def load_user_reward_files(files: dict[str, tuple[str, str]]) -> None:
    """Load reward files under the module names another process gave them (a scoring worker, before unpickling)."""
    for module_name, (path, source) in files.items():
        if module_name not in sys.modules:
            _load_source_module(module_name, path, source)
        _USER_FILES[module_name] = (path, source)


def resolve_reward(ref: str) -> RewardFn:
    """Turn a reference into a lingshu reward function (see the module docstring for the order)."""
    from lingshu_rl.rewards.adapters import adapt_foreign

    ref = ref.strip()
    builtins = builtin_rewards()
    if ref in builtins:
        return builtins[ref]
    tried = [f"built-in name (known: {', '.join(sorted(builtins))})"]

    try:
        fn = _from_entry_point(ref)
    except Exception as err:  # a broken plugin package must not hide the other attempts
        tried.append(f"entry point {ref!r} in group {ENTRY_POINT_GROUP!r}: failed to load: {err!r}")
    else:
        if fn is not None:
            return adapt_foreign(fn)
        tried.append(f"entry point in group {ENTRY_POINT_GROUP!r}: none named {ref!r}")

    if ":" in ref:
        path_part = ref.rpartition(":")[0]
        looks_like_file = path_part.endswith(".py") or "/" in path_part or "\\" in path_part
        loaders = [("file", _from_file), ("module", _from_module)]
        if not looks_like_file:
            loaders.reverse()
        for kind, loader in loaders:
            try:
                fn = loader(ref)
            except Exception as err:
                tried.append(f"{kind} {ref!r}: {type(err).__name__}: {err}")
                continue
            if not callable(fn):
                tried.append(f"{kind} {ref!r}: found {type(fn).__name__}, which is not callable")
                continue
            return adapt_foreign(fn)
    else:
        tried.append("'package.module:function' or 'path/to/file.py:function': the reference has no ':'")
    raise RewardResolutionError(f"cannot resolve reward {ref!r}. Tried, in order:\n  - " + "\n  - ".join(tried))
