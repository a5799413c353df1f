"""Compiled per-class plans: dataclasses with vic tags <-> flat guestinfo maps.

Each Python type is compiled once into a node with `enc(sink, value, key, depth, follow)`
and `dec(get, current, key, depth, follow) -> (found, value)`. `depth` is the
reference's recursion budget (-1: unbounded; 0: skip), `follow` whether pointers are
followed. `found` is the reference's "this reported a value" (§6.3), which decides
whether optional structures materialise.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Union

from . import keys as K
from . import scalars as S
from .gotime import GoTime, format_go, parse_go
from .schema import tag_of
from .types import ARRAY, FLOAT32, INTERFACE, IP, UINT, GoKind

# A decoder never makes more slice elements or map entries than this from one key.
MAX_ELEMENTS = 1 << 16

Sink = Callable[[str, str], Any]
Getter = Callable[[str], "str | None"]


class DecodeError(ValueError):
    """Malformed guestinfo data; the message names the key."""


# ---------------------------------------------------------------------------- nodes

class Node:
    kind = "unsupported"

    def enc(self, sink: Sink, value: Any, key: str, depth: int, follow: bool) -> None:
        return None

    def dec(self, get: Getter, cur: Any, key: str, depth: int, follow: bool) -> tuple[bool, Any]:
        return True, cur

    def zero(self) -> Any:
        return None

    def fmt(self, value: Any) -> str:           # text of one primitive-slice element / map key
        raise TypeError(f"{self.kind} has no text form")

    def parse(self, text: str, key: str) -> Any:
        return self.zero()


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

    def dec(self, get, cur, key, depth, follow):
        if depth == 0:
            return True, cur
        text = get(key)
        if text is None:
            return False, cur
        return True, self._parse(text)

    def zero(self):
        return self._zero

    def fmt(self, value):
        return self._fmt(value)

    def parse(self, text, key):
        return self._parse(text)


class Float32Node(ScalarNode):
    def __init__(self) -> None:
        super().__init__("float32", lambda v: S.format_float(S.widen_float32(v)),
                         S.parse_float, 0.0)

    def dec(self, get, cur, key, depth, follow):
        if depth == 0:
            return True, cur
        if get(key) is None:
            return False, cur
        raise DecodeError(f"{key}: a float32 field cannot be decoded (the reference panics)")

    def parse(self, text, key):
        if text == "":
            return 0.0
        raise DecodeError(f"{key}: float32 elements cannot be decoded (the reference panics)")


class UintElementNode(ScalarNode):
    """uint as a slice element (uint fields themselves are unsupported)."""

    def __init__(self) -> None:
        super().__init__("uint", S.format_int, S.parse_uint, 0)


class TimeNode(Node):
    kind = "time"

    def enc(self, sink, value, key, depth, follow):
        if depth != 0:
            sink(key, format_go(value))

    def dec(self, get, cur, key, depth, follow):
        if depth == 0:
            return True, cur
        text = get(key)
        if text is None:
            return False, cur
        return True, parse_go(text) or GoTime()

    def zero(self):
        return GoTime()


class BytesNode(Node):
    kind = "bytes"

    def __init__(self, cls: type, nilable: bool) -> None:
        self.cls = cls
        self.nilable = nilable

    def enc(self, sink, value, key, depth, follow):
        if depth != 0 and value:
            sink(key, S.format_bytes(value))

    def dec(self, get, cur, key, depth, follow):
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


class PointerNode(Node):
    kind = "pointer"

    def __init__(self, inner: Node) -> None:
        self.inner = inner

    def enc(self, sink, value, key, depth, follow):
        if depth == 0 or value is None or not follow:
            return
        self.inner.enc(sink, value, key, depth - 1, follow)

    def dec(self, get, cur, key, depth, follow):
        if depth == 0 or not follow:
            return True, cur
        found, value = self.inner.dec(get, cur, key, depth - 1, follow)
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
                # Deviation (DESIGN.md): the joined form cannot carry '|'; index it.
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
            raise DecodeError(f"{key}: negative slice length {text!r}")
        if n > MAX_ELEMENTS:
            raise DecodeError(f"{key}: slice length {text!r} exceeds {MAX_ELEMENTS}")
        return n

    def dec(self, get, cur, key, depth, follow):
        if depth == 0:
            return True, cur
        if self.array:
            get(key)
            raise DecodeError(f"{key}: a fixed-size array cannot be decoded (the reference panics)")
        depth -= 1
        n = self._length(get(key), key)
        # Go reuses the existing slice when it is long enough, else starts from zeros
        reuse = cur is not None and n <= len(cur)
        elem = self.elem
        if self.mode == "indexed":
            out = []
            for i in range(n):
                prior = cur[i] if reuse else None
                found, item = elem.dec(get, prior, K.append(key, f"|{i}"), depth, follow)
                if not found:
                    item = prior if reuse else elem.zero()
                out.append(item)
            return True, out
        joined = get(K.append(key, "~"))
        if joined is None:
            base = list(cur[:n]) if reuse else [elem.zero() for _ in range(n)]
            if self.mode == "unsupported":
                return False, base
            return self._indexed_values(get, key, base)
        pieces = joined.split("|", n) if n else []
        if len(pieces) < n:
            raise DecodeError(
                f"{K.append(key, '~')}: {len(pieces)} values for the length {n} in {key}")
        return True, [elem.parse(p, key) for p in pieces[:n]]

    def _indexed_values(self, get, key, base):
        """The indexed form our encoder writes when an element contains '|'. It always
        writes every element, so a missing `K|0` means the data is not in that form (one
        extra probe beyond the reference's, and only when `K~` is missing)."""
        parse = self.elem.parse
        for i in range(len(base)):
            text = get(K.append(key, f"|{i}"))
            if text is None:
                if i == 0:
                    return False, base
                raise DecodeError(f"{K.append(key, f'|{i}')}: missing element {i} of {len(base)}")
            base[i] = parse(text, key)
        return True, base


class MapNode(Node):
    kind = "map"

    def __init__(self, keynode: Node, value: Node) -> None:
        self.keynode = keynode
        self.value = value

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

    def dec(self, get, cur, key, depth, follow):
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
            raise DecodeError(f"{key}: {len(names)} map entries exceed {MAX_ELEMENTS}")
        for text in names:
            k = parse(text, key)
            ekey = K.append(key, "|" + text)
            if vkind == "struct":
                found, v = vnode.dec(get, None, ekey, depth, follow)
                if found:
                    this[k] = v
            elif vkind in ("pointer", "slice", "map"):
                _, this[k] = vnode.dec(get, this.get(k), ekey, depth, follow)
            else:
                found, v = vnode.dec(get, this.get(k), ekey, depth, follow)
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
    kind = "struct"

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.fields: list[FieldPlan] = []

    def zero(self):
        return self.cls()

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

    def dec(self, get, cur, key, depth, follow):
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
                                    follow if fp.follow is None else fp.follow)
            setattr(obj, fp.attr, value)
            found = found or ok
        return found, obj


# -------------------------------------------------------------------------- compile

_NODES: dict[Any, Node] = {}
_STR = ScalarNode("string", lambda v: v, lambda t: t, "")
_INT = ScalarNode("int", S.format_int, S.parse_int, 0)
_BOOL = ScalarNode("bool", S.format_bool, S.parse_bool, False)
_FLOAT = ScalarNode("float", S.format_float, S.parse_float, 0.0)
_TIME = TimeNode()
_UNSUPPORTED = Node()


def _optional_arg(tp: Any) -> Any:
    """X for Optional[X] / X | None, else None."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _marker(tp: Any) -> tuple[Any, GoKind | None]:
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
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
        (elem_tp,) = typing.get_args(base) or (Any,)
        return _slice_node(elem_tp, array=True)
    tp = base
    inner = _optional_arg(tp)
    if inner is not None:
        origin = typing.get_origin(_marker(inner)[0])
        if origin in (list, dict) or (isinstance(inner, type) and issubclass(inner, bytes)):
            return node_for(inner, nilable=True)
        return PointerNode(node_for(inner))
    origin = typing.get_origin(tp)
    if origin is list:
        (elem_tp,) = typing.get_args(tp) or (Any,)
        return _slice_node(elem_tp, array=False)
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
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
        if dataclasses.is_dataclass(tp):
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
    """The compiled plan of a dataclass: fields in declaration order with their key rules."""
    node = _NODES.get((cls, False))
    if isinstance(node, StructNode):
        return node
    node = StructNode(cls)
    _NODES[(cls, False)] = node
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
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
        node.fields.append(FieldPlan(f.name, tag.go_name, name, not tag.tagged, flags, depth,
                                     follow, skip_enc, skip_dec, node_for(hints[f.name])))
    return node


# ------------------------------------------------------------------------------ API

def encode_into(sink: Sink, obj: Any, prefix: str = "") -> None:
    """Write `obj`'s keys into `sink(key, value)` in the reference's call order."""
    struct_node(type(obj)).enc(sink, obj, prefix, -1, True)


def encode(obj: Any, prefix: str = "") -> dict[str, str]:
    """Exactly the map Go's Encode writes into a MapSink."""
    out: dict[str, str] = {}
    struct_node(type(obj)).enc(out.__setitem__, obj, prefix, -1, True)
    return out


def _getter(source: Any) -> Getter:
    if isinstance(source, (dict, Mapping)) or hasattr(source, "get"):
        get = source.get
    elif callable(source):
        def get(key: str, _f=source) -> str | None:
            try:
                return _f(key)
            except LookupError:
                return None
    else:
        raise TypeError(f"source must be a mapping or a callable, not {type(source).__name__}")

    def checked(key: str) -> str | None:
        value = get(key)
        if value is not None and not isinstance(value, str):
            raise DecodeError(f"{key}: value is {type(value).__name__}, not a string")
        return value
    return checked


def decode(source: Any, cls_or_obj: Any, prefix: str = "") -> Any:
    """Decode into a new object (class given) or merge into an existing one in place."""
    get = _getter(source)
    is_class = isinstance(cls_or_obj, type)
    node = struct_node(cls_or_obj if is_class else type(cls_or_obj))
    try:
        found, value = node.dec(get, None if is_class else cls_or_obj, prefix, -1, True)
    except DecodeError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError) as e:
        raise DecodeError(f"malformed data under {prefix or 'the root'!r}: {e}") from e
    if is_class and not found:
        raise DecodeError(f"no keys found for {node.cls.__name__} under {prefix or 'the root'!r}")
    return value


def calculate_keys(obj: Any, fieldspec: str, prefix: str = "") -> list[str]:
    """The keys the encoder uses for a dotted Go field path, as the reference's CalculateKeys:
    Go field names for structs, keys for maps, indices for slices, `*` for every member.
    Where the reference panics (unknown name, missing map key, index out of range, a nil
    pointer on the way), DecodeError names the spec."""
    segs = fieldspec.split(".") if fieldspec else []
    return _calc(struct_node(type(obj)), obj, segs, prefix, fieldspec)


def calculate_key(obj: Any, fieldspec: str, prefix: str = "") -> str:
    found = calculate_keys(obj, fieldspec, prefix)
    if len(found) != 1:
        raise DecodeError(f"{fieldspec!r} names {len(found)} keys, not one")
    return found[0]


def _calc(node: Node, value: Any, segs: list[str], key: str, spec: str) -> list[str]:
    while isinstance(node, PointerNode):
        if value is None and segs:
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
            out += _calc(fp.node, getattr(value, fp.attr), rest, fkey, spec)
        return out
    if isinstance(node, MapNode):
        entries = {node.keynode.fmt(k): v for k, v in (value or {}).items()}
        if seg == "*":
            names = sorted(entries)
        elif seg in entries:
            names = [seg]
        else:
            raise DecodeError(f"{spec!r}: no map key {seg!r}")
        out = []
        for name in names:
            out += _calc(node.value, entries[name], rest, K.append(key, "|" + name), spec)
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
            out = []
            for i, item in enumerate(items):
                out += _calc(node.elem, item, rest, K.append(key, f"|{i}"), spec)
            return out
        i = _index(seg, spec)
        if not 0 <= i < len(items):
            raise DecodeError(f"{spec!r}: index {i} out of range for {len(items)} elements")
        sub = K.append(key, f"|{i}") if struct_elems else K.append(key, "~")
        return _calc(node.elem, items[i], rest, sub, spec)
    raise DecodeError(f"{spec!r}: cannot go into {seg!r} of a {node.kind}")


def _index(seg: str, spec: str) -> int:
    if not S.is_int(seg):
        raise DecodeError(f"{spec!r}: {seg!r} is not a slice index")
    return int(seg)
