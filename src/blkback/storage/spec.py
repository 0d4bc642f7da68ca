"""Parse export specs such as ``memory:1G,delay=10ms,rate=40M`` and open the storage.

Grammar::

    SPEC    := BACKEND ( "," OPTION )*
    BACKEND := "file:" PATH [ ":" SIZE ] | "memory:" SIZE | "null:" SIZE
    OPTION  := ("readonly" | "ro") [ "=" BOOL ] | "direct=" ("auto" | BOOL)   backend options
             | "delay=" DUR | "delay-read=" DUR | "delay-write=" DUR   delay filter
             | "rate=" SIZE["/s"] | "rate-burst=" SIZE                  rate filter
             | "error=" P | "error-range=" SIZE "-" SIZE               error filter
             | "error-ops=" OP ("," | "+") ... | "error-seed=" N

* SIZE is bytes, or a number with a binary suffix: ``K``/``KB``/``KiB`` = 1024, then M, G, T,
  P, E (``1.5G`` is fine when it comes out whole).
* DUR is a number with its unit, ``s``, ``ms``, ``us`` (or ``µs``) or ``ns``; only ``0``
  may go without one. A bare ``delay=10`` is refused rather than guessed: nbdkit's delay
  filter reads it as seconds, while latency tools (fio, iostat, ioping) speak in ms and
  us, so either reading surprises half of the people who write it.
* BOOL is ``yes``/``no``, ``true``/``false``, ``on``/``off`` or ``1``/``0``; a flag
  written alone (``readonly``) means yes.
* Backend options may appear anywhere. Filter options build the filter stack **from the
  backend outwards, in the order given**: each filter wraps everything to its left, so the
  last one written is the first a request meets. Consecutive options of one filter
  configure one layer; repeating an option starts a new layer of that filter.
* ``error-ops`` takes a list, which may go on after commas (``error-ops=read,write``) or use
  ``+`` (``error-ops=read+write``). ``error-range=OFF-END`` is end-exclusive.
* ``file:PATH:SIZE``: the last ``:`` part is the size when it parses as one, so a path
  ending in ``:<size>`` needs an explicit size. Paths cannot contain commas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Final

from blkback.clock import NS_PER_MS, NS_PER_S, NS_PER_US
from blkback.errors import ConfigError

from .anon import AnonMemoryStorage
from .base import MAX_SIZE, Storage
from .fd import MemoryStorage, open_file
from .filters import OPS, DelayFilter, ErrorFilter, RateFilter
from .null import NullStorage

_SIZE_RE: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgtpe])(?:i?b)?|b)?\s*$", re.I)
_SHIFTS: Final = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_DUR_RE: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)\s*(s|ms|us|µs|ns)?\s*$", re.I)
_DUR_UNITS_NS: Final = {"s": NS_PER_S, "ms": NS_PER_MS, "us": NS_PER_US, "µs": NS_PER_US, "ns": 1}

_FLAGS: Final = {"readonly", "ro"}
_BOOLS: Final = {
    **dict.fromkeys(("yes", "y", "true", "on", "1"), True),
    **dict.fromkeys(("no", "n", "false", "off", "0"), False),
}
_BOOL_WORDS: Final = "yes/no, true/false, on/off or 1/0"
_BACKEND_KEYS: Final = {"direct"}
# option -> filter family; consecutive options of one family make one layer
_FILTER_KEYS: Final = {
    "delay": "delay",
    "delay-read": "delay",
    "delay-write": "delay",
    "rate": "rate",
    "rate-burst": "rate",
    "error": "error",
    "error-range": "error",
    "error-ops": "error",
    "error-seed": "error",
}
_LIST_KEYS: Final = {"error-ops"}
_KINDS: Final = ("file", "memory", "memfd", "null")


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``4096``, ``64M``, ``1.5GiB``, ``2T`` (binary multiples) into bytes.

    Args:
        text: The size as written.
        what: What the size is, for the error message.

    Returns:
        The size in bytes.

    Raises:
        ConfigError: Not a size, not a whole number of bytes, or above 2**63 - 1.
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise ConfigError(
            f"bad {what} {text!r}: expected bytes or a number with K, M, G, T (e.g. 64M, 1G)"
        )
    number = Decimal(m.group(1))
    value = number * (1 << _SHIFTS[m.group(2).lower()]) if m.group(2) else number
    if value != value.to_integral_value():
        raise ConfigError(f"bad {what} {text!r}: not a whole number of bytes")
    if value > MAX_SIZE:
        raise ConfigError(f"bad {what} {text!r}: larger than {MAX_SIZE} bytes")
    return int(value)


def parse_duration_ns(text: str, what: str = "duration") -> int:
    """Parse ``10ms``, ``0.5s``, ``200us``, ``0`` into nanoseconds (rounded).

    Raises:
        ConfigError: Not a duration, or a number other than 0 without a unit.
    """
    m = _DUR_RE.match(text)
    if m is None:
        raise ConfigError(f"bad {what} {text!r}: expected e.g. 10ms, 500us, 0.2s")
    if m.group(2) is None and Decimal(m.group(1)) != 0:
        n = m.group(1)
        raise ConfigError(
            f"bad {what} {text!r}: give a unit, e.g. {n}ms, {n}us or {n}s "
            "(a bare number is ambiguous: nbdkit reads seconds, latency tools print ms)"
        )
    try:
        unit_ns = _DUR_UNITS_NS[(m.group(2) or "s").lower()]
        value = round(Decimal(m.group(1)) * unit_ns)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
        raise ConfigError(f"bad {what} {text!r}") from exc
    return value


def _parse_probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError as exc:
        raise ConfigError(f"bad error probability {text!r}: expected a number in [0, 1]") from exc
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"bad error probability {text!r}: must be between 0 and 1")
    return p


def _parse_range(text: str) -> tuple[int, int]:
    start_text, sep, end_text = text.partition("-")
    if not sep:
        raise ConfigError(f"bad error-range {text!r}: expected OFFSET-END, e.g. 0-4096 or 1M-2M")
    start = parse_size(start_text, "error-range start")
    end = parse_size(end_text, "error-range end")
    if end <= start:
        raise ConfigError(f"bad error-range {text!r}: END must be above OFFSET")
    return start, end


def _parse_ops(values: list[str]) -> frozenset[str]:
    ops: set[str] = set()
    for value in values:
        for op in value.replace("+", " ").split():
            op = op.lower()
            if op == "all":
                ops.update(OPS)
            elif op in OPS:
                ops.add(op)
            else:
                raise ConfigError(
                    f"bad error-ops entry {op!r}: expected some of {', '.join(OPS)} or all"
                )
    if not ops:
        raise ConfigError("error-ops needs at least one operation, e.g. error-ops=read,write")
    return frozenset(ops)


@dataclass(frozen=True)
class FilterSpec:
    """One filter layer: its family and its raw options (list values for list options)."""

    family: str
    options: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageSpec:
    """A parsed spec: the backend and the filter layers, innermost first."""

    kind: str
    size: int | None
    path: str | None = None
    readonly: bool = False
    direct: str = "auto"
    filters: tuple[FilterSpec, ...] = ()


def parse_spec(spec: str) -> StorageSpec:
    """Parse an export spec (see the module docstring) without opening anything.

    Args:
        spec: E.g. ``file:/var/tmp/disk.img:10G,direct=off`` or ``null:1G,delay=5ms``.

    Returns:
        The parsed spec; filter options are validated when the filters are built.

    Raises:
        ConfigError: One clear message for the first problem found.
    """
    head, *options = spec.split(",")
    kind, sep, rest = head.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in _KINDS:
        raise ConfigError(
            f"bad storage spec {spec!r}: expected file:PATH[:SIZE], memory:SIZE, "
            "memfd:SIZE or null:SIZE"
        )
    path: str | None = None
    size: int | None
    if kind == "file":
        path, size = _split_file(rest)
    else:
        if not rest.strip():
            raise ConfigError(f"bad storage spec {spec!r}: {kind}: needs a size, e.g. {kind}:1G")
        size = parse_size(rest, f"{kind} size")
    if size == 0:
        raise ConfigError(f"bad storage spec {spec!r}: the size must be above 0")

    readonly = False
    direct = "auto"
    layers: list[FilterSpec] = []
    last_key: str | None = None
    for raw in options:
        token = raw.strip()
        if not token:
            raise ConfigError(f"bad storage spec {spec!r}: empty option (two commas?)")
        key, eq, value = token.partition("=")
        key = key.strip().lower()
        if key in _FLAGS:
            readonly = _parse_bool(value, key, spec) if eq else True
            last_key = None
            continue
        if not eq:
            if last_key not in _LIST_KEYS:
                raise ConfigError(f"bad storage spec {spec!r}: unknown option {token!r}")
            # `error-ops=read,write`: the list goes on after the comma.
            layers[-1].options[last_key].append(token)
            continue
        value = value.strip()
        if key in _BACKEND_KEYS:
            if kind != "file":
                raise ConfigError(f"bad storage spec {spec!r}: direct= applies to file: only")
            if value.lower() == "auto":
                direct = "auto"
            elif value.lower() in _BOOLS:
                direct = "on" if _BOOLS[value.lower()] else "off"
            else:
                raise ConfigError(
                    f"bad storage spec {spec!r}: direct= takes auto, on or off (or {_BOOL_WORDS})"
                )
            last_key = None
            continue
        family = _FILTER_KEYS.get(key)
        if family is None:
            known = ", ".join(sorted({*_FLAGS, *_BACKEND_KEYS, *_FILTER_KEYS}))
            raise ConfigError(f"bad storage spec {spec!r}: unknown option {key!r} (known: {known})")
        if not layers or layers[-1].family != family or key in layers[-1].options:
            layers.append(FilterSpec(family))
        layers[-1].options[key] = [value]
        last_key = key
    for layer in layers:
        # Validate the filter options now, so a bad spec fails before anything is opened:
        # building the layer over a throw-away null backend runs exactly the real checks.
        _build_filter(NullStorage(1), layer)
    return StorageSpec(
        kind=kind, size=size, path=path, readonly=readonly, direct=direct, filters=tuple(layers)
    )


def _parse_bool(value: str, key: str, spec: str) -> bool:
    try:
        return _BOOLS[value.strip().lower()]
    except KeyError:
        raise ConfigError(
            f"bad storage spec {spec!r}: {key}= takes {_BOOL_WORDS}, not {value.strip()!r}"
        ) from None


def _split_file(rest: str) -> tuple[str, int | None]:
    path, sep, tail = rest.rpartition(":")
    size: int | None = None
    if sep:
        try:
            size = parse_size(tail, "file size")
        except ConfigError:
            path = rest  # the colon belongs to the path
        else:
            rest = path
    if not rest:
        raise ConfigError("bad storage spec: file: needs a path, e.g. file:/var/tmp/disk.img:1G")
    return rest, size


def _build_filter(inner: Storage, layer: FilterSpec) -> Storage:
    opts = {k: v[0] for k, v in layer.options.items()}
    if layer.family == "delay":
        both = parse_duration_ns(opts["delay"], "delay") if "delay" in opts else 0
        read_ns = (
            parse_duration_ns(opts["delay-read"], "delay-read") if "delay-read" in opts else both
        )
        write_ns = (
            parse_duration_ns(opts["delay-write"], "delay-write") if "delay-write" in opts else both
        )
        return DelayFilter(inner, read_ns=read_ns, write_ns=write_ns)
    if layer.family == "rate":
        if "rate" not in opts:
            raise ConfigError("rate-burst= needs rate= next to it, e.g. rate=40M,rate-burst=1M")
        text = opts["rate"]
        text = text[:-2] if text.lower().endswith("/s") else text
        rate = parse_size(text, "rate")
        if rate == 0:
            raise ConfigError("bad rate '0': must be above 0 bytes/s")
        burst = parse_size(opts["rate-burst"], "rate-burst") if "rate-burst" in opts else None
        if burst == 0:
            raise ConfigError("bad rate-burst '0': must be above 0 bytes")
        return RateFilter(inner, rate=rate, burst=burst)
    # error
    if "error" not in opts and "error-range" not in opts:
        raise ConfigError("error-ops=/error-seed= need error=P or error-range=OFF-END next to them")
    probability = _parse_probability(opts["error"]) if "error" in opts else 1.0
    error_range = _parse_range(opts["error-range"]) if "error-range" in opts else None
    ops = _parse_ops(layer.options["error-ops"]) if "error-ops" in layer.options else OPS
    seed_text = opts.get("error-seed", "0")
    try:
        seed = int(seed_text)
    except ValueError as exc:
        raise ConfigError(f"bad error-seed {seed_text!r}: expected an integer") from exc
    return ErrorFilter(inner, probability=probability, error_range=error_range, ops=ops, seed=seed)


def build_storage(parsed: StorageSpec) -> Storage:
    """Open the backend of a parsed spec and wrap it in its filters.

    Raises:
        ConfigError: Bad filter options, or the backend cannot be opened.
    """
    backend: Storage
    if parsed.kind == "file":
        assert parsed.path is not None
        backend = open_file(
            parsed.path, parsed.size, readonly=parsed.readonly, direct=parsed.direct
        )
    elif parsed.kind == "memory":
        assert parsed.size is not None
        backend = AnonMemoryStorage(parsed.size, readonly=parsed.readonly)
    elif parsed.kind == "memfd":
        assert parsed.size is not None
        backend = MemoryStorage(parsed.size, readonly=parsed.readonly)
    else:
        assert parsed.size is not None
        backend = NullStorage(parsed.size, readonly=parsed.readonly)
    storage: Storage = backend
    try:
        for layer in parsed.filters:
            storage = _build_filter(storage, layer)
    except BaseException:
        backend.close()
        raise
    return storage


def open_storage(spec: str) -> Storage:
    """Parse ``spec`` and open the storage it describes.

    Args:
        spec: E.g. ``memory:1G,readonly`` or ``null:64M,delay=2ms,rate=40M``.

    Returns:
        The storage, filters outermost; ``repr()`` of it describes the stack.

    Raises:
        ConfigError: The spec is malformed or the backend cannot be opened.
    """
    return build_storage(parse_spec(spec))


def describe(storage: Storage) -> str:
    """One line describing a storage stack, from the client side down to the backend.

    E.g. ``rate(40 MiB/s, burst 4 MiB) > delay(read=10ms, write=10ms) > memory(1 GiB)``.
    """
    return repr(storage)
