"""Per-class plans: dataclasses with vic tags <-> flat guestinfo maps.

Each Python type is compiled once into a plan node with `enc(sink, value, key, depth,
follow)` and `dec(get, current, key, depth, follow, spend) -> (found, value)`, the
interpreter of vmware/vic pkg/vsphere/extraconfig/encode.go and decode.go. `depth` is
the reference's recursion budget (-1: unbounded; 0: skip), `follow` whether pointers
are followed. `found` is the reference's "this reported a value" (decodeStruct's
`found` in decode.go), which decides whether optional structures materialise.

`encode`/`decode` run code generated from these plans (extraconfig/codegen.py); the
interpreter here is the reference it is tested against, and the path for what the
generated code hands back (prefixes carrying `@` suffixes, unusual node kinds).
"""
from __future__ import annotations

import gc
import os
import sys
from _collections_abc import Callable, Mapping, Sequence   # collections.abc's, already loaded by os

from . import keys as K
from . import scalars as S
from .gotime import GoTime, format_go, parse_go
from .record import fields, is_struct, type_hints
from .schema import tag_of
from .types import ARRAY, FLOAT32, INTERFACE, IP, UINT, GoKind

# A decoder never makes more slice elements or map entries than this from one key.
MAX_ELEMENTS = 1 << 16

UnionType = type(int | None)   # types.UnionType, without importing types (startup)
Sink = Callable[[str, str], object]
Getter = Callable[[str], "str | None"]


class DecodeError(ValueError):
    """Malformed guestinfo data; the message names the key.

    `key` is the guestinfo key at fault when known. A budget error (DecodeBudgetError)
    also says which limit was exceeded."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DecodeBudgetError(DecodeError):
    """One decode would read more keys or make more entries than its DecodeBudget allows."""

    def __init__(self, message: str, key: str | None, limit: str, allowed: int) -> None:
        super().__init__(message, key)
        self.limit = limit            # "lookups" or "entries"
        self.allowed = allowed


class PlanError(Exception):
    """A record or dataclass whose fields the codec cannot compile (an annotation it cannot
    resolve or take apart): a fault of the model, never reported as a DecodeError."""


# ---------------------------------------------------------------------------- budget

BUDGET_ENV = "EXTRACONFIG_DECODE_BUDGET"


class DecodeBudget:
    """What one decode may cost: `lookups` keys read, `entries` map entries and slice
    elements made. A map or slice charges for all its elements before making any, so a
    hostile map fails before it allocates much. The defaults hold about 11,000 sessions
    of 10 arguments and 10 environment entries each (26 lookups and 21 entries a
    session), far beyond what a VM's guestinfo holds in practice."""

    __slots__ = ("lookups", "entries")
    DEFAULT_LOOKUPS = 300_000
    DEFAULT_ENTRIES = 300_000

    def __init__(self, lookups: int = DEFAULT_LOOKUPS, entries: int = DEFAULT_ENTRIES) -> None:
        self.lookups = lookups
        self.entries = entries

    @classmethod
    def from_text(cls, text: str) -> "DecodeBudget":
        """`lookups=N,entries=M` (either may be left out: its default stays)."""
        values: dict[str, int] = {}
        for item in text.replace(" ", "").split(","):
            if not item:
                continue
            name, _, number = item.partition("=")
            if name not in ("lookups", "entries") or not number.isdigit():
                raise ValueError(f"{BUDGET_ENV}: {item!r} is not lookups=N or entries=N")
            values[name] = int(number)
        return cls(**values)

    def __repr__(self) -> str:
        return f"DecodeBudget(lookups={self.lookups}, entries={self.entries})"


def _default_budget() -> DecodeBudget:
    text = os.environ.get(BUDGET_ENV)
    if not text:
        return DecodeBudget()
    try:
        return DecodeBudget.from_text(text)
    except ValueError:
        return DecodeBudget()         # a bad setting must not stop the agent: the defaults


DEFAULT_BUDGET = _default_budget()


class Spend:
    """What is left of one decode's budget. Containers charge their elements up front:
    `entries` for each map entry or slice element, `lookups` for the keys each will read
    outside nested containers (those charge for themselves)."""

    __slots__ = ("lookups", "entries", "budget")

    def __init__(self, budget: DecodeBudget) -> None:
        self.budget = budget
        self.lookups = budget.lookups
        self.entries = budget.entries

    def charge(self, key: str, entries: int, lookups: int) -> None:
        self.entries -= entries
        self.lookups -= lookups
        if self.entries < 0 or self.lookups < 0:
            self.exceeded(key, entries, lookups)

    def exceeded(self, key: str, entries: int, lookups: int) -> None:
        b = self.budget
        if self.entries < 0:
            limit, allowed, what = "entries", b.entries, f"{entries:,} more map entries or " \
                "slice elements"
        else:
            limit, allowed, what = "lookups", b.lookups, f"{lookups:,} more key lookups"
        raise DecodeBudgetError(
            f"{key or 'the root'}: decoding would need {what}, over the decode budget of "
            f"{allowed:,} {limit} (raise it with decode(..., budget=DecodeBudget({limit}=N)) "
            f"or {BUDGET_ENV}={limit}=N in the environment)", key, limit, allowed)


def _duplicate(names: list[str], key: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DecodeError(f"{key}: the key list names {name!r} more than once", key)
        seen.add(name)


# ---------------------------------------------------------------------------- nodes

class Node:
    kind = "unsupported"

    def enc(self, sink: Sink, value: Any, key: str, depth: int, follow: bool) -> None:
        return None

    def dec(self, get: Getter, cur: Any, key: str, depth: int, follow: bool,
            spend: Spend) -> tuple[bool, Any]:
        return True, cur

    def zero(self) -> Any:
        return None

    def fmt(self, value: Any) -> str:           # text of one primitive-slice element / map key
        raise TypeError(f"{self.kind} has no text form")

    def parse(self, text: str, key: str) -> Any:
        return self.zero()

    def static(self, depth: int, follow: bool) -> int:
        """Keys `dec` reads outside the elements of maps and slices (see static_lookups)."""
        return 0


class ScalarNode(Node):
    def __init__(self, kind: str, fmt: Callable[[Any], str], parse: Callable[[str], Any],
                 zero: Any) -> None:
        self.kind = kind
        self._fmt = fmt
        self._parse = parse
        self._zero = zero

    def enc(self, sink, value, key, depth, follow):
        if depth != 0:
            sink(key, self._fmt(value))

    def dec(self, get, cur, key, depth, follow, spend):
        if depth == 0:
            return True, cur
        text = get(key)
        if text is None:
            return False, cur
        return True, self._parse(text)

    def zero(self):
        return self._zero

    def static(self, depth, follow):
        return 1

    def fmt(self, value):
        return self._fmt(value)

    def parse(self, text, key):
        return self._parse(text)


class Float32Node(ScalarNode):
    def __init__(self) -> None:
        super().__init__("float32", lambda v: S.format_float(S.widen_float32(v)),
                         S.parse_float, 0.0)

    def dec(self, get, cur, key, depth, follow, spend):
        if depth == 0:
            return True, cur
        if get(key) is None:
            return False, cur
        raise DecodeError(f"{key}: a float32 field cannot be decoded (the reference panics)", key)

    def parse(self, text, key):
        if text == "":
            return 0.0
        raise DecodeError(f"{key}: float32 elements cannot be decoded (the reference panics)", key)


class UintElementNode(ScalarNode):
    """uint as a slice element (uint fields themselves are unsupported)."""

    def __init__(self) -> None:
        super().__init__("uint", S.format_int, S.parse_uint, 0)


class TimeNode(Node):
    kind = "time"

    def enc(self, sink, value, key, depth, follow):
        if depth != 0:
            sink(key, format_go(value))

    def dec(self, get, cur, key, depth, follow, spend):
        if depth == 0:
            return True, cur
        text = get(key)
        if text is None:
            return False, cur
        return True, parse_go(text) or GoTime()

    def zero(self):
        return GoTime()

    def static(self, depth, follow):
        return 1


class BytesNode(Node):
    kind = "bytes"

    def __init__(self, cls: type, nilable: bool) -> None:
        self.cls = cls
        self.nilable = nilable

    def enc(self, sink, value, key, depth, follow):
        if depth != 0 and value:
            sink(key, S.format_bytes(value))

    def dec(self, get, cur, key, depth, follow, spend):
        if depth == 0:
            return True, cur
        text = get(key)
        if text is None:
            return False, cur
        raw = S.parse_bytes(text)
        if raw is None:
            return False, cur
        return True, self.cls(raw)

    def zero(self):
        return None if self.nilable else self.cls(b"")

    def static(self, depth, follow):
        return 1


class PointerNode(Node):
    kind = "pointer"

    def __init__(self, inner: Node) -> None:
        self.inner = inner

    def static(self, depth, follow):
        return static_lookups(self.inner, depth - 1, follow) if follow else 0

    def enc(self, sink, value, key, depth, follow):
        if depth == 0 or value is None or not follow:
            return
        self.inner.enc(sink, value, key, depth - 1, follow)

    def dec(self, get, cur, key, depth, follow, spend):
        if depth == 0 or not follow:
            return True, cur
        found, value = self.inner.dec(get, cur, key, depth - 1, follow, spend)
        if cur is not None:
            return True, value
        return True, value if found else None


class SliceNode(Node):
    kind = "slice"

    def __init__(self, elem: Node, mode: str, array: bool) -> None:
        self.elem = elem
        self.mode = mode          # "indexed" | "joined" | "unsupported"
        self.array = array

    def zero(self):
        return [] if self.array else None

    def static(self, depth, follow):
        return 1 if self.array or self.mode == "indexed" else 2     # K; K and K~

    def enc(self, sink, value, key, depth, follow):
        if depth == 0 or not value or self.mode == "unsupported":
            return
        depth -= 1
        elem = self.elem
        if self.mode == "indexed":
            for i, item in enumerate(value):
                elem.enc(sink, item, K.append(key, f"|{i}"), depth, follow)
        else:
            texts = [elem.fmt(item) for item in value]
            if any("|" in t for t in texts):
                # Deviation from encode.go's encodeSlice: the joined form cannot carry
                # '|'; index it.
                for i, text in enumerate(texts):
                    sink(K.append(key, f"|{i}"), text)
            else:
                sink(K.append(key, "~"), "|".join(texts))
        sink(key, str(len(value) - 1))

    def _length(self, text: str | None, key: str) -> int:
        if text is None or text == "":
            return 0
        n = S.parse_int(text) + 1
        if n < 0:
            raise DecodeError(f"{key}: negative slice length {text!r}", key)
        if n > MAX_ELEMENTS:
            raise DecodeError(f"{key}: slice length {text!r} exceeds {MAX_ELEMENTS}", key)
        return n

    def dec(self, get, cur, key, depth, follow, spend):
        if depth == 0:
            return True, cur
        if self.array:
            get(key)
            raise DecodeError(
                f"{key}: a fixed-size array cannot be decoded (the reference panics)", key)
        depth -= 1
        n = self._length(get(key), key)
        elem = self.elem
        if self.mode == "indexed":
            spend.charge(key, n, n * static_lookups(elem, depth, follow))
        else:
            spend.charge(key, n, 0)
        # Go reuses the existing slice when it is long enough, else starts from zeros
        reuse = cur is not None and n <= len(cur)
        if self.mode == "indexed":
            out = []
            for i in range(n):
                prior = cur[i] if reuse else None
                found, item = elem.dec(get, prior, K.append(key, f"|{i}"), depth, follow, spend)
                if not found:
                    item = prior if reuse else elem.zero()
                out.append(item)
            return True, out
        joined = get(K.append(key, "~"))
        if joined is None:
            base = list(cur[:n]) if reuse else [elem.zero() for _ in range(n)]
            if self.mode == "unsupported":
                return False, base
            return self.indexed_values(get, key, base, spend)
        pieces = joined.split("|", n) if n else []
        if len(pieces) < n:
            bad = K.append(key, "~")
            raise DecodeError(f"{bad}: {len(pieces)} values for the length {n} in {key}", bad)
        return True, [elem.parse(p, key) for p in pieces[:n]]

    def indexed_values(self, get, key, base, spend):
        """The indexed form our encoder writes when an element contains '|'. It always
        writes every element, so a missing `K|0` means the data is not in that form (one
        extra probe beyond the reference's, and only when `K~` is missing)."""
        spend.charge(key, 0, len(base))
        parse = self.elem.parse
        for i in range(len(base)):
            text = get(K.append(key, f"|{i}"))
            if text is None:
                if i == 0:
                    return False, base
                bad = K.append(key, f"|{i}")
                raise DecodeError(f"{bad}: missing element {i} of {len(base)}", bad)
            base[i] = parse(text, key)
        return True, base


class MapNode(Node):
    kind = "map"

    def __init__(self, keynode: Node, value: Node) -> None:
        self.keynode = keynode
        self.value = value

    def static(self, depth, follow):
        return 1

    def enc(self, sink, value, key, depth, follow):
        if depth == 0 or not value:
            return
        depth -= 1
        fmt = self.keynode.fmt
        vnode = self.value
        texts = []
        for k, v in value.items():
            text = fmt(k)
            texts.append(text)
            vnode.enc(sink, v, K.append(key, "|" + text), depth, follow)
        texts.sort()
        sink(key, "|".join(texts))

    def dec(self, get, cur, key, depth, follow, spend):
        if depth == 0:
            return True, cur
        depth -= 1
        this = cur if cur is not None else {}
        listed = get(key)
        if listed is None:
            return False, this
        if listed == "":
            return True, this
        parse = self.keynode.parse
        vnode = self.value
        vkind = vnode.kind
        names = listed.split("|")
        if len(names) > MAX_ELEMENTS:
            raise DecodeError(f"{key}: {len(names)} map entries exceed {MAX_ELEMENTS}", key)
        if len(set(names)) != len(names):
            _duplicate(names, key)
        spend.charge(key, len(names), len(names) * static_lookups(vnode, depth, follow))
        for text in names:
            k = parse(text, key)
            ekey = K.append(key, "|" + text)
            if vkind == "struct":
                found, v = vnode.dec(get, None, ekey, depth, follow, spend)
                if found:
                    this[k] = v
            elif vkind in ("pointer", "slice", "map"):
                _, this[k] = vnode.dec(get, this.get(k), ekey, depth, follow, spend)
            else:
                found, v = vnode.dec(get, this.get(k), ekey, depth, follow, spend)
                if found:
                    this[k] = v
        return True, this


class FieldPlan:
    """One field of a compiled struct: where its value lives and how its key is made."""
    __slots__ = ("attr", "go_name", "name", "untagged", "flags", "depth", "follow",
                 "skip_encode", "skip_decode", "node", "name_ro", "name_rw")

    def __init__(self, attr: str, go_name: str, name: str, untagged: bool, flags: int,
                 depth: int | None, follow: bool | None, skip_encode: bool, skip_decode: bool,
                 node: Node) -> None:
        self.attr = attr
        self.go_name = go_name
        self.name = name                  # the key segment
        self.untagged = untagged
        self.flags = flags
        self.depth = depth                # recurse depth=N override
        self.follow = follow
        self.skip_encode = skip_encode
        self.skip_decode = skip_decode
        self.node = node
        self.name_ro = name.replace(".", "/")
        self.name_rw = name.replace("/", ".")


def _field_key(prefix: str, fp: FieldPlan) -> str | None:
    flags = K.flags_from_key(prefix) if fp.untagged else fp.flags
    return K.join_key(prefix, flags, fp.name)


_PLAIN = K.HIDDEN | K.READ_ONLY | K.READ_WRITE | K.VOLATILE
_ROOT_LEN = len(K.ROOT)


def _struct_keys(prefix: str, fields: list[FieldPlan]) -> list[str | None]:
    """join_key for every field of one struct, sharing the work on the common prefix.

    Equal to `[_field_key(prefix, fp) for fp in fields]`; the slow general path is kept
    for prefixes or scopes carrying `@` suffixes."""
    if "@" in prefix or (prefix.startswith(K.VISIBLE) and not prefix.startswith(K.ROOT)):
        return [_field_key(prefix, fp) for fp in fields]
    inherited = K.flags_from_key(prefix)
    visible = prefix.startswith(K.VISIBLE)
    bases: dict[str, str] = {}
    out: list[str | None] = []
    for fp in fields:
        flags = inherited if fp.untagged else fp.flags
        if flags & ~_PLAIN:
            out.append(K.join_key(prefix, flags, fp.name))
            continue
        if flags & K.HIDDEN:
            path = fp.name if prefix == "" else prefix + "/" + fp.name
            out.append(path[_ROOT_LEN + 1:] if visible else path)
            continue
        sep = "." if flags & K.READ_WRITE else "/"
        base = bases.get(sep)
        if base is None:
            other = "/" if sep == "." else "."
            if prefix == "":
                base = K.ROOT + sep
            elif visible:
                base = K.ROOT + prefix[_ROOT_LEN:].replace(other, sep) + sep
            else:
                base = K.ROOT + sep + prefix.replace(other, sep) + sep
            bases[sep] = base
        out.append(base + (fp.name_rw if sep == "." else fp.name_ro))
    return out


class StructNode(Node):
    """A record's or dataclass's plan. Its `fields` are compiled when first used, so a
    decode compiles only the structs it meets: a config without networks or mounts never
    pays for their plans (nor resolves their annotations)."""
    kind = "struct"

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __getattr__(self, name: str):
        if name != "fields":
            raise AttributeError(name)
        # No plan is asked for its fields while one is being compiled (node_for only
        # makes nodes), so a type that contains itself needs no guard here.
        try:
            self.fields = _field_plans(self.cls)
        except Exception as e:
            raise PlanError(f"{self.cls.__qualname__}: its fields cannot be compiled: "
                            f"{e!r}") from e
        return self.fields

    def zero(self):
        return self.cls()

    def static(self, depth, follow):
        depth -= 1
        return sum(static_lookups(fp.node, depth if fp.depth is None else fp.depth,
                                  follow if fp.follow is None else fp.follow)
                   for fp in self.fields if not fp.skip_decode)

    def enc(self, sink, value, key, depth, follow):
        if depth == 0 or value is None:
            return
        depth -= 1
        for fp, fkey in zip(self.fields, _struct_keys(key, self.fields)):
            if fkey is None or fp.skip_encode:
                continue
            fp.node.enc(sink, getattr(value, fp.attr), fkey,
                        depth if fp.depth is None else fp.depth,
                        follow if fp.follow is None else fp.follow)

    def dec(self, get, cur, key, depth, follow, spend):
        if depth == 0:
            return True, cur
        depth -= 1
        obj = cur if cur is not None else self.cls()
        found = False
        for fp, fkey in zip(self.fields, _struct_keys(key, self.fields)):
            if fkey is None:
                continue
            if fp.skip_decode:
                found = True
                continue
            ok, value = fp.node.dec(get, getattr(obj, fp.attr), fkey,
                                    depth if fp.depth is None else fp.depth,
                                    follow if fp.follow is None else fp.follow, spend)
            setattr(obj, fp.attr, value)
            found = found or ok
        return found, obj


_STATIC: dict[tuple[Node, int, bool], int] = {}


def static_lookups(node: Node, depth: int, follow: bool) -> int:
    """How many keys `node.dec(..., depth, follow)` reads outside the elements of the maps
    and slices within it (those charge for their own elements): what a container charges
    the budget per element, before decoding any."""
    if depth == 0:
        return 0
    memo = (node, depth if depth > 0 else -1, follow)
    n = _STATIC.get(memo)
    if n is None:
        _STATIC[memo] = 0             # a type that contains itself is counted once
        n = _STATIC[memo] = node.static(depth, follow)
    return n


# -------------------------------------------------------------------------- compile

_NODES: dict[Any, Node] = {}
_STR = ScalarNode("string", lambda v: v, lambda t: t, "")
_INT = ScalarNode("int", S.format_int, S.parse_int, 0)
_BOOL = ScalarNode("bool", S.format_bool, S.parse_bool, False)
_FLOAT = ScalarNode("float", S.format_float, S.parse_float, 0.0)
_TIME = TimeNode()
_UNSUPPORTED = Node()


# Type annotations are taken apart through their attributes (`__origin__`, `__args__`,
# `__metadata__`), as typing.get_origin/get_args do, so that a model written with
# builtins (`list[str] | None`) compiles without importing typing (PID 1's startup).
# A typing.Union or Annotated object exists only once typing has been imported.

def _origin(tp: Any) -> Any:
    if isinstance(tp, UnionType):
        return UnionType
    return getattr(tp, "__origin__", None)


def _args(tp: Any) -> tuple:
    return getattr(tp, "__args__", ())


def _optional_arg(tp: Any) -> Any:
    """X for Optional[X] / X | None, else None."""
    origin = _origin(tp)
    typing = sys.modules.get("typing")
    if origin is UnionType or (typing is not None and origin is typing.Union):
        args = [a for a in _args(tp) if a is not type(None)]
        if len(args) == 1 and len(_args(tp)) == 2:
            return args[0]
    return None


def _marker(tp: Any) -> tuple[Any, GoKind | None]:
    meta = getattr(tp, "__metadata__", None)     # Annotated[base, *meta]
    if meta is not None:
        base = tp.__origin__
        for m in meta:
            if isinstance(m, GoKind):
                return base, m
        return base, None
    return tp, None


def _slice_node(elem_tp: Any, array: bool) -> SliceNode:
    base, marker = _marker(elem_tp)
    elem = node_for(elem_tp)
    if marker is UINT:
        elem = UintElementNode()
    if elem.kind in ("struct", "time") or (isinstance(elem, BytesNode) and elem.cls is IP):
        mode = "indexed"
    elif isinstance(elem, ScalarNode):
        mode = "joined"
    else:
        mode = "unsupported"
    return SliceNode(elem, mode, array)


def node_for(tp: Any, nilable: bool = False) -> Node:
    """The compiled node for a Python type annotation (cached)."""
    cache_key = (tp, nilable)
    try:
        return _NODES[cache_key]
    except (KeyError, TypeError):
        pass
    node = _compile(tp, nilable)
    try:
        _NODES[cache_key] = node
    except TypeError:
        pass
    return node


def _compile(tp: Any, nilable: bool) -> Node:
    base, marker = _marker(tp)
    if marker is UINT or marker is INTERFACE:
        return _UNSUPPORTED
    if marker is FLOAT32:
        return Float32Node()
    if marker is ARRAY:
        (elem_tp,) = _args(base) or (object,)
        return _slice_node(elem_tp, array=True)
    tp = base
    inner = _optional_arg(tp)
    if inner is not None:
        origin = _origin(_marker(inner)[0])
        if origin in (list, dict) or (isinstance(inner, type) and issubclass(inner, bytes)):
            return node_for(inner, nilable=True)
        return PointerNode(node_for(inner))
    origin = _origin(tp)
    if origin is list:
        (elem_tp,) = _args(tp) or (object,)
        return _slice_node(elem_tp, array=False)
    if origin is dict:
        ktp, vtp = _args(tp)
        return MapNode(node_for(ktp), node_for(vtp))
    if tp is GoTime:
        return _TIME
    if isinstance(tp, type):
        if issubclass(tp, bytes):
            return BytesNode(tp, nilable)
        if tp is bool:
            return _BOOL
        if tp is int:
            return _INT
        if tp is float:
            return _FLOAT
        if tp is str:
            return _STR
        if is_struct(tp):
            return struct_node(tp)
    return _UNSUPPORTED


def _recurse(raw: str) -> tuple[bool, int | None, bool | None, bool, bool]:
    """(valid, depth, follow, skip_encode, skip_decode) from a recurse tag, read as Go does
    (no trimming; a malformed depth skips the field; unknown properties are ignored)."""
    depth = follow = None
    skip_enc = skip_dec = False
    for prop in raw.split(",") if raw else ():
        if prop.startswith("depth"):
            parts = prop.split("=")
            if len(parts) != 2 or not S.is_int(parts[1]):
                return False, None, None, False, False
            depth = int(parts[1])
        elif prop == "nofollow":
            follow = False
        elif prop == "follow":
            follow = True
        elif prop == "skip-encode":
            skip_enc = True
        elif prop == "skip-decode":
            skip_dec = True
    return True, depth, follow, skip_enc, skip_dec


def struct_node(cls: type) -> StructNode:
    """The plan of a record or dataclass: fields in declaration order with their key rules
    (compiled at their first use)."""
    node = _NODES.get((cls, False))
    if isinstance(node, StructNode):
        return node
    node = _NODES[(cls, False)] = StructNode(cls)
    return node


def _field_plans(cls: type) -> list[FieldPlan]:
    plans: list[FieldPlan] = []
    hints = type_hints(cls)
    for f in fields(cls):
        tag = tag_of(f)
        if tag is None:
            continue                      # like an unexported Go field
        if tag.tagged:
            flags = K.scope_flags(tag.scope)
            if flags & K.INVALID:
                continue
            name = tag.key.strip() if tag.key else tag.go_name   # Go trims after choosing
        else:
            flags = 0
            name = tag.go_name
        valid, depth, follow, skip_enc, skip_dec = _recurse(tag.recurse)
        if not valid:
            continue
        plans.append(FieldPlan(f.name, tag.go_name, name, not tag.tagged, flags, depth,
                               follow, skip_enc, skip_dec, node_for(hints[f.name])))
    return plans


# ------------------------------------------------------------------------------ API

# Generated functions per class (extraconfig/codegen.py). Generating and compiling them
# costs about what the interpreter spends on a few thousand keys (~10 ms for
# ExecutorConfig), too much for the agent's one small decode at boot: a class gets them
# once GENERATE_AFTER keys have gone through the interpreter, or at once for a dict
# source that large. EXTRACONFIG_CODEGEN: "auto" (that), "1" (always), "0" (never).
CODEGEN = os.environ.get("EXTRACONFIG_CODEGEN", "auto")
GENERATE_AFTER = 3000
_ENCODERS: dict[type, Callable[..., None]] = {}
_SINK_ENCODERS: dict[type, Callable[..., None]] = {}
_DECODERS: dict[type, Callable[..., tuple[bool, Any]]] = {}
_INTERPRETED: dict[tuple[type, str], int] = {}      # keys read or written so far
_TABLES = {"decode": _DECODERS, "encode": _ENCODERS, "encode_sink": _SINK_ENCODERS}


def _generated(table: dict, cls: type, kind: str) -> Callable:
    fn = table.get(cls)
    if fn is None:
        from . import codegen
        fn = table[cls] = codegen.function(struct_node(cls), kind)
    return fn


def _choose(cls: type, kind: str, coming: int) -> Callable | None:
    """The generated function when it is time to use one, else None (interpret).
    `coming`: the keys this call will move, when known."""
    if CODEGEN == "0":
        return None
    table = _TABLES[kind]
    fn = table.get(cls)
    if fn is None and (CODEGEN == "1" or
                       _INTERPRETED.get((cls, kind), 0) + coming >= GENERATE_AFTER):
        fn = _generated(table, cls, kind)
    return fn


def _interpreted(cls: type, kind: str, keys: int) -> None:
    _INTERPRETED[(cls, kind)] = _INTERPRETED.get((cls, kind), 0) + keys


def prepare(*classes: type) -> None:
    """Generate the encode and decode functions of `classes` now (for a long-running
    process about to move many keys, and benchmarks)."""
    for cls in classes:
        for kind, table in _TABLES.items():
            _generated(table, cls, kind)


def encode_into(sink: Sink, obj: Any, prefix: str = "") -> None:
    """Write `obj`'s keys into `sink(key, value)` in the reference's call order."""
    cls = type(obj)
    fn = _choose(cls, "encode_sink", 0)
    if fn is not None:
        fn(sink, obj, prefix)
        return
    count = 0

    def counting(key: str, value: str) -> None:
        nonlocal count
        count += 1
        sink(key, value)
    try:
        struct_node(cls).enc(counting, obj, prefix, -1, True)
    finally:
        _interpreted(cls, "encode_sink", count)


def encode(obj: Any, prefix: str = "") -> dict[str, str]:
    """Exactly the map Go's Encode writes into a MapSink."""
    out: dict[str, str] = {}
    cls = type(obj)
    fn = _choose(cls, "encode", 0)
    if fn is not None:
        fn(out, obj, prefix)
        return out
    try:
        struct_node(cls).enc(out.__setitem__, obj, prefix, -1, True)
    finally:
        _interpreted(cls, "encode", len(out))
    return out


def _checked(get: Getter) -> Getter:
    def checked(key: str) -> str | None:
        value = get(key)
        if value is not None and not isinstance(value, str):
            raise DecodeError(f"{key}: value is {type(value).__name__}, not a string", key)
        return value
    return checked


def _getter(source: Any) -> Getter:
    if type(source) is dict:
        # Check the values once here rather than on every get: str.join refuses anything
        # but strings, in C. A map with another value somewhere is checked per get, so
        # only the keys decode reads are held to it.
        try:
            "".join(source.values())
        except TypeError:
            return _checked(source.get)
        return source.get
    if isinstance(source, Mapping) or hasattr(source, "get"):
        return _checked(source.get)
    if callable(source):
        def get(key: str, _f=source) -> str | None:
            try:
                return _f(key)
            except LookupError:
                return None
        return _checked(get)
    raise TypeError(f"source must be a mapping or a callable, not {type(source).__name__}")


def decode(source: Any, cls_or_obj: Any, prefix: str = "", *,
           budget: DecodeBudget | None = None) -> Any:
    """Decode into a new object (class given) or merge into an existing one in place.

    `budget` bounds the work (DecodeBudget; default DEFAULT_BUDGET, which the
    EXTRACONFIG_DECODE_BUDGET environment variable sets). Anything malformed, and a
    budget exceeded, raise DecodeError; read_map_names can still name the sessions."""
    get = _getter(source)
    is_class = isinstance(cls_or_obj, type)
    cls = cls_or_obj if is_class else type(cls_or_obj)
    node = struct_node(cls)
    spend = Spend(DEFAULT_BUDGET if budget is None else budget)
    fn = _choose(cls, "decode", len(source) if type(source) is dict else 0)
    # A decode builds a tree of many small containers and no reference cycles: the cyclic
    # collector, run as they pile up, would only walk the whole heap again and again
    # (most of the decode time at 10,000 sessions). It is paused for one decode, whose
    # length the budget bounds, and left as it was found.
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        spend.charge(prefix, 0, static_lookups(node, -1, True))
        if fn is not None:
            found, value = fn(get, None if is_class else cls_or_obj, prefix, spend)
        else:
            found, value = node.dec(get, None if is_class else cls_or_obj, prefix, -1, True,
                                    spend)
    except DecodeError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError) as e:
        raise DecodeError(f"malformed data under {prefix or 'the root'!r}: {e}") from e
    finally:
        if paused:
            gc.enable()
        if fn is None:
            _interpreted(cls, "decode", spend.budget.lookups - spend.lookups)
    if is_class and not found:
        raise DecodeError(f"no keys found for {node.cls.__name__} under {prefix or 'the root'!r}")
    return value


def decode_generic(source: Any, cls_or_obj: Any, prefix: str = "", *,
                   budget: DecodeBudget | None = None) -> Any:
    """`decode` through the plan interpreter only (the reference the generated code is
    tested against)."""
    get = _getter(source)
    is_class = isinstance(cls_or_obj, type)
    node = struct_node(cls_or_obj if is_class else type(cls_or_obj))
    spend = Spend(DEFAULT_BUDGET if budget is None else budget)
    try:
        spend.charge(prefix, 0, static_lookups(node, -1, True))
        found, value = node.dec(get, None if is_class else cls_or_obj, prefix, -1, True, spend)
    except DecodeError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError) as e:
        raise DecodeError(f"malformed data under {prefix or 'the root'!r}: {e}") from e
    if is_class and not found:
        raise DecodeError(f"no keys found for {node.cls.__name__} under {prefix or 'the root'!r}")
    return value


def encode_generic(obj: Any, prefix: str = "", sink: Sink | None = None) -> dict[str, str]:
    """`encode` (or `encode_into` when `sink` is given) through the plan interpreter."""
    out: dict[str, str] = {}
    struct_node(type(obj)).enc(out.__setitem__ if sink is None else sink, obj, prefix, -1, True)
    return out


def read_map_names(source: Any, cls: type, fieldspec: str | Sequence[str],
                   prefix: str = "") -> list[Any]:
    """The names a map field lists, read with one lookup and without decoding anything
    else: for naming what a config holds when decoding it failed, e.g.
    `read_map_names(GuestSource(t), ExecutorConfig, "Sessions")`. In list order, each once;
    [] when the key is missing. DecodeError when the value is not a string or lists more
    than MAX_ELEMENTS names."""
    keys = calculate_keys(cls, fieldspec, prefix)
    node = _resolve(struct_node(cls), fieldspec)
    if len(keys) != 1 or not isinstance(node, MapNode):
        raise DecodeError(f"{fieldspec!r} does not name one map field of {cls.__name__}")
    key = keys[0]
    listed = _getter(source)(key)
    if not listed:
        return []
    names = listed.split("|")
    if len(names) > MAX_ELEMENTS:
        raise DecodeError(f"{key}: {len(names)} map entries exceed {MAX_ELEMENTS}", key)
    out = []
    for text in dict.fromkeys(names):
        out.append(node.keynode.parse(text, key))
    return out


def _resolve(node: Node, fieldspec: str | Sequence[str]) -> Node:
    """The plan node a field path ends at, through struct fields, map values and slice
    elements."""
    segs = fieldspec.split(".") if isinstance(fieldspec, str) else list(fieldspec)
    for seg in segs:
        while isinstance(node, PointerNode):
            node = node.inner
        if isinstance(node, StructNode):
            node = next(fp.node for fp in node.fields if fp.go_name == seg)
        elif isinstance(node, MapNode):
            node = node.value
        elif isinstance(node, SliceNode):
            node = node.elem
    while isinstance(node, PointerNode):
        node = node.inner
    return node


def calculate_keys(obj: Any, fieldspec: str | Sequence[str], prefix: str = "") -> list[str]:
    """The keys the encoder uses for a dotted Go field path, as the reference's CalculateKeys:
    Go field names for structs, keys for maps, indices for slices, `*` for every member.
    Where the reference panics (unknown name, missing map key, index out of range, a nil
    pointer on the way), DecodeError names the spec.

    `fieldspec` may also be a list of segments (for map keys containing '.'), and `obj` a
    class: map keys and slice indices are then taken as given, without a value to check
    them against (`calculate_keys(ExecutorConfig, ["Sessions", sid, "Started"])`)."""
    if isinstance(fieldspec, str):
        segs, spec = (fieldspec.split(".") if fieldspec else []), fieldspec
    else:
        segs = list(fieldspec)
        spec = ".".join(segs)
    if isinstance(obj, type):
        return _calc(struct_node(obj), None, segs, prefix, spec, True)
    return _calc(struct_node(type(obj)), obj, segs, prefix, spec, False)


def calculate_key(obj: Any, fieldspec: str | Sequence[str], prefix: str = "") -> str:
    found = calculate_keys(obj, fieldspec, prefix)
    if len(found) != 1:
        raise DecodeError(f"{fieldspec!r} names {len(found)} keys, not one")
    return found[0]


def _calc(node: Node, value: Any, segs: list[str], key: str, spec: str,
          any_member: bool) -> list[str]:
    while isinstance(node, PointerNode):
        if value is None and segs and not any_member:
            raise DecodeError(f"{spec!r}: nil pointer before {segs[0]!r}")
        node = node.inner
    if not segs:
        return [key]
    seg, rest = segs[0], segs[1:]
    if isinstance(node, StructNode):
        if value is None:
            value = node.zero()
        plans = node.fields if seg == "*" else [f for f in node.fields if f.go_name == seg]
        if not plans:
            raise DecodeError(f"{spec!r}: {node.cls.__name__} has no field {seg!r}")
        out: list[str] = []
        for fp in plans:
            fkey = _field_key(key, fp) or ""
            out += _calc(fp.node, getattr(value, fp.attr), rest, fkey, spec, any_member)
        return out
    if isinstance(node, MapNode):
        if any_member:
            if seg == "*":
                raise DecodeError(f"{spec!r}: '*' needs a value to list the map's keys")
            return _calc(node.value, None, rest, K.append(key, "|" + seg), spec, any_member)
        entries = {node.keynode.fmt(k): v for k, v in (value or {}).items()}
        if seg == "*":
            names = sorted(entries)
        elif seg in entries:
            names = [seg]
        else:
            raise DecodeError(f"{spec!r}: no map key {seg!r}")
        out = []
        for name in names:
            out += _calc(node.value, entries[name], rest, K.append(key, "|" + name), spec,
                         any_member)
        return out
    if isinstance(node, BytesNode):
        if seg != "*":
            _index(seg, spec)
        return [key]
    if isinstance(node, SliceNode):
        items = value or []
        struct_elems = node.elem.kind in ("struct", "time")
        if seg == "*":
            if not struct_elems:
                return [K.append(key, "~")]
            if any_member:
                raise DecodeError(f"{spec!r}: '*' needs a value to list the slice's elements")
            out = []
            for i, item in enumerate(items):
                out += _calc(node.elem, item, rest, K.append(key, f"|{i}"), spec, any_member)
            return out
        i = _index(seg, spec)
        if any_member:
            if i < 0:
                raise DecodeError(f"{spec!r}: negative index {i}")
            item = None
        elif not 0 <= i < len(items):
            raise DecodeError(f"{spec!r}: index {i} out of range for {len(items)} elements")
        else:
            item = items[i]
        sub = K.append(key, f"|{i}") if struct_elems else K.append(key, "~")
        return _calc(node.elem, item, rest, sub, spec, any_member)
    raise DecodeError(f"{spec!r}: cannot go into {seg!r} of a {node.kind}")


def _index(seg: str, spec: str) -> int:
    if not S.is_int(seg):
        raise DecodeError(f"{spec!r}: {seg!r} is not a slice index")
    return int(seg)
