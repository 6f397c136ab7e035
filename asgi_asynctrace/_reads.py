"""The diagnoses of the reads and other operations a request made: a read made again with
nothing written to it between (repeated-read), independent reads one after another
(sequential-awaits), one call site's operation back to back (n-plus-one).

    repeats = repeated_reads(trace, times, path, notes, add, stack_of)   # the repeats' ids

Called by ``_findings.diagnose``, whose ``add`` each one reports through.
Exports: is_read, n_plus_one, repeated_reads, runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ._model import frame_origin

if TYPE_CHECKING:
    from ._analysis import PathStep, ResourceTimes
    from ._findings import AnalysisSettings
    from ._model import Resource, Trace

__all__ = ["is_read", "n_plus_one", "repeated_reads", "runs"]

_READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_READ_STATEMENTS: Final = ("select", "with", "show", "explain", "values")


def is_read(t: ResourceTimes, notes: dict[str, Any]) -> bool:
    """Reads can be reordered; writes, and reads after a write, are taken as dependent."""
    if t.type in ("cache-get", "kv-get", "kv-list"):
        return True
    if t.type == "fetch":
        return str(notes.get("method", "")).upper() in _READ_METHODS
    if t.type == "db-query":
        return str(notes.get("statement", "")).lstrip().lower().startswith(_READ_STATEMENTS)
    return False


def n_plus_one(
    ops: list[ResourceTimes], by_id: dict[int, Resource], add: Any, s: AnalysisSettings
) -> set[int]:
    """Name each chain of operations from one call site run one after another; return them."""
    sites: dict[tuple[str, int], list[ResourceTimes]] = {}
    for t in ops:
        r = by_id[t.async_id]
        if r.stack_id is not None:
            sites.setdefault((r.type, r.stack_id), []).append(t)
    named: set[int] = set()
    for same in sites.values():
        chain: list[ResourceTimes] = []
        for op in [*same, None]:
            if op is not None and (not chain or chain[-1].ended <= op.created):
                chain.append(op)
                continue
            if len(chain) >= s.n_plus_one_min:
                spans = [c.ended - c.created for c in chain]
                add("n-plus-one",
                    f"{len(chain)} x {chain[0].type} from one call site, one after another "
                    f"({chain[0].label}, ...)", sum(spans) - max(spans),
                    tuple(c.async_id for c in chain),
                    "fetch them in one batch (one query with IN, a multi-get, one request for "
                    "all), or run them together with asyncio.gather")  # fmt: skip
                named.update(c.async_id for c in chain)
            chain = [op] if op is not None else []
    return named


def runs(run: list[ResourceTimes], notes: dict[int, dict[str, Any]], add: Any) -> None:
    """Diagnose one run of back-to-back operations: which of them are independent reads."""
    chain: list[ResourceTimes] = []
    for t in run:
        note = notes[t.async_id]
        if not is_read(t, note):
            _sequential(chain, add)
            chain = []
            continue
        chain.append(t)
        if note.get("hit") is False:  # a miss: what follows fills it, so depends on it
            _sequential(chain, add)
            chain = []
    _sequential(chain, add)


def _sequential(chain: list[ResourceTimes], add: Any) -> None:
    if len(chain) < 2:
        return
    spans = [t.ended - t.created for t in chain]
    names = ", then ".join(f"{t.type} {t.label}" for t in chain[:4])
    more = f" (+{len(chain) - 4} more)" if len(chain) > 4 else ""
    add("sequential-awaits",
        f"{len(chain)} independent reads ran one after another: {names}{more}",
        sum(spans) - max(spans), tuple(t.async_id for t in chain),
        "if they do not need each other's results, start them together "
        "(asyncio.gather or a TaskGroup); the request would wait only for the slowest")  # fmt: skip


# A statement with parameters reads what its parameters say, which a trace does not keep: two
# of them with the same text may read different rows.
_PARAMETERS: Final = re.compile(r"\?|\$\d|%s|%\(|(?<![:\w]):\w")
_MASKED: Final = re.compile(r"[?&][^=&#]*=\*(?:[&#]|$)")
# A write to a cache or key-value key makes the next read of it a new one.
_WRITES: Final = {"cache-put": "cache", "cache-delete": "cache", "kv-put": "kv", "kv-delete": "kv"}


def _read_key(t: ResourceTimes, note: dict[str, Any]) -> tuple[str, ...] | None:
    """What a read reads, when two reads of it can be told to be the same; else None."""
    if t.type == "fetch":
        method, url = str(note.get("method", "")).upper(), str(note.get("url", ""))
        if method not in ("GET", "HEAD") or not url:
            return None
        if _MASKED.search(url):  # query values masked: the same query if its digest is
            digest = note.get("queryDigest")
            return ("fetch", url, method, str(digest)) if digest else None
        return ("fetch", url, method)
    if t.type in ("cache-get", "kv-get"):
        key = note.get("key")
        family = t.type.split("-")[0]
        return (family, str(key), str(note.get("op", note.get("command", "")))) if key else None
    if t.type == "db-query" and is_read(t, note):
        statement = str(note.get("statement", ""))
        return ("db-query", statement) if not _PARAMETERS.search(statement) else None
    return None


def repeated_reads(
    trace: Trace, times: dict[int, ResourceTimes], path: list[PathStep],
    notes: dict[int, dict[str, Any]], add: Callable[..., None],
    stack: Callable[[int], tuple[str, ...]],
) -> set[int]:  # fmt: skip
    """Name each read made again in the request with nothing written to what it read in
    between: a GET of the same URL, a get of the same cache or key-value key, the same SELECT
    without parameters. What it cost is the time the request waited on the repeats (their
    share of the critical path); where, the repeat's creation stack (``stack``) from where it
    parted from the first read's. Returns the repeats' ids (the first read of each is not)."""
    reading: dict[tuple[str, ...], list[ResourceTimes]] = {}  # reads since the last write
    groups: list[list[ResourceTimes]] = []

    def written(what: tuple[str, ...]) -> None:  # the reads of what it wrote end there
        for read in [k for k in reading if k[: len(what)] == what]:
            groups.append(reading.pop(read))

    ordered = sorted((times[r.async_id] for r in trace.resources if r.async_id in times),
                     key=lambda t: t.created)  # fmt: skip
    for t in ordered:
        note = notes[t.async_id]
        family, method = _WRITES.get(t.type), str(note.get("method", "")).upper()
        if family is not None:  # a write: the next read of its key reads anew
            written((family, str(note.get("key"))))
        elif t.type == "db-query" and not is_read(t, note):
            written(("db-query",))
        elif t.type == "fetch" and method not in ("GET", "HEAD"):
            written(("fetch", str(note.get("url"))))
        else:
            read = _read_key(t, note)
            if read is not None:
                reading.setdefault(read, []).append(t)
    groups.extend(reading.values())
    repeats: set[int] = set()
    on_path: dict[int, int] = {}
    for step in path:
        on_path[step.async_id] = on_path.get(step.async_id, 0) + step.end - step.start
    for reads in groups:
        if len(reads) < 2:
            continue
        again = reads[1:]
        repeats.update(t.async_id for t in again)
        waited = sum(on_path.get(t.async_id, 0) for t in again)
        add("repeated-read",
            f"{reads[0].type} {reads[0].label} was read {len(reads)} times in this request, "
            "with nothing written to it in between",
            waited, tuple(t.async_id for t in reads),
            "keep the first result for the rest of the request (pass it along, or keep it per "
            "request in request.state or a ContextVar) instead of reading it again",
            stack=_where_again(stack(reads[0].async_id), stack(again[0].async_id)))  # fmt: skip
    return repeats


def _where_again(first: tuple[str, ...], again: tuple[str, ...]) -> tuple[str, ...]:
    """The repeat's stack from where it parted from the first read's: from its innermost frame
    of the app's own code that the first read's stack does not hold, or that holds it with
    another call inside (Python 3.10's frames have no column, so two calls on one line read
    the same frame). Both reads often go through one helper of the app's (``get_user``),
    which says nothing of which call was the second; the frame that called it does."""
    for i, frame in enumerate(again):
        if frame_origin(frame) != "app":
            continue
        if frame not in first:
            return again[i:]
        j = first.index(frame)
        if (again[i - 1] if i else None) != (first[j - 1] if j else None):
            return again[i:]
    return again  # the same stack: one call site, run twice
