"""Code versions that follow the code: a feature set's timeframe changes version when its declaration,
or the source of a function that computes it, changes, and only then.

The functions are found, not listed: from each declared feature's family (its lambdas) and from
``compute_feature_vectors``, every ``marketfs`` function they name is followed, transitively, and its
source hashed with the plain constants it reads. Editing ``market.bollinger`` changes the version of
every set that declares a Bollinger feature; editing the EMA crossover leaves fs_v1 as it is.
"""

from __future__ import annotations

import hashlib
import inspect
import types
from collections.abc import Callable, Iterator

from marketfs.features.registry import FeatureSet

_PACKAGE = "marketfs."


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _referenced(fn: Callable) -> Iterator[object]:
    """Globals ``fn`` names, and attributes of the marketfs modules it names (``market.returns``)."""
    names = {name for code in _code_objects(fn.__code__) for name in code.co_names}
    glob = fn.__globals__
    for name in sorted(names):
        value = glob.get(name)
        if isinstance(value, types.ModuleType) and value.__name__.startswith(_PACKAGE):
            yield from (getattr(value, attr) for attr in sorted(names) if hasattr(value, attr))
        elif value is not None:
            yield value
    for cell in fn.__closure__ or ():
        try:
            yield cell.cell_contents
        except ValueError:  # an empty cell
            continue


def source_closure(roots: list[Callable]) -> dict[str, str]:
    """Source (or value) of every marketfs function and constant reachable from ``roots``, by name."""
    found: dict[str, str] = {}
    stack = list(roots)
    while stack:
        fn = stack.pop()
        source = inspect.getsource(fn)
        # Named by source, not line: code added above a function must not change its version.
        key = f"{fn.__module__}.{fn.__qualname__}#{hashlib.sha256(source.encode()).hexdigest()[:16]}"
        if key in found:
            continue
        found[key] = source
        for value in _referenced(fn):
            if isinstance(value, types.FunctionType) and value.__module__.startswith(_PACKAGE):
                stack.append(value)
            elif isinstance(value, int | float | str | tuple | frozenset) and not isinstance(value, bool):
                found.setdefault(f"{fn.__module__}:{value!r}", repr(value))
    return found


def _roots(fs: FeatureSet, timeframe: str) -> list[Callable]:
    from marketfs.features.compute import compute_feature_vectors

    roots: list[Callable] = [compute_feature_vectors]
    for feature in fs.for_timeframe(timeframe):
        spec = feature.spec
        roots += [
            c
            for c in (spec.expr, spec.recursions, spec.lookback, spec.null_reasons)
            if isinstance(c, types.FunctionType)
        ]
    return roots


def code_version(fs: FeatureSet, timeframe: str) -> str:
    """``<version>-<12 hex>``: a hash of the timeframe's declaration and of the source that computes it.

    Gate bounds and drift take part: they decide which days are written. Owner and description do not.
    """
    digest = hashlib.sha256()
    # What decides the values and which days are written; owner and description do not.
    declared = [
        (f.name, f.family, f.params, f.version, f.drift, f.gate_bounds(timeframe)) for f in fs.for_timeframe(timeframe)
    ]
    digest.update(repr((fs.version, timeframe, declared)).encode())
    for name, source in sorted(source_closure(_roots(fs, timeframe)).items()):
        digest.update(name.encode())
        digest.update(source.encode())
    return f"{fs.version}-{digest.hexdigest()[:12]}"
