"""Records: plain data classes the codec reads like dataclasses, made without the
dataclasses module.

`@record` is `@dataclasses.dataclass` for what a config model needs: fields from the
class's own annotations in order, defaults (a value, or `field(default_factory=...)` /
`vic(...)` / `untagged(...)`), an `__init__` taking them by position or name, `__eq__`,
`__repr__`, and `frozen=True` (immutable and hashable). Making one costs no `compile`:
`dataclasses` imports `inspect` (and with it `ast`, `dis`, `tokenize`) and compiles three
methods per class, which was most of the agent's startup before its primary ran.

A record is a dataclass to the dataclasses module too: `dataclasses.fields`,
`is_dataclass`, `replace` and `asdict` work on it, through `__dataclass_fields__`, which
is made (importing dataclasses) the first time something asks for it. Code on the
agent's path uses `fields` and `is_struct` here, which take records and dataclasses
alike without importing anything.

Annotations are strings (`from __future__ import annotations`) written as builtins
(`list[str] | None`, not `Optional[List[str]]`), so resolving them (`type_hints`) needs
no `typing` either.
"""
from __future__ import annotations

import builtins
import sys
from _thread import get_ident

MISSING = type("MISSING", (), {"__repr__": lambda self: "MISSING"})()


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a frozen record (dataclasses' error of the same name)."""


class Field:
    """One field: `name`, `type` (the annotation, a string), `default` or
    `default_factory` (MISSING when there is none), `metadata` (a dict)."""
    __slots__ = ("name", "type", "default", "default_factory", "metadata", "owner")

    def __init__(self, default=MISSING, default_factory=MISSING, metadata=None):
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot give both default and default_factory")
        self.name = ""
        self.type = ""
        self.default = default
        self.default_factory = default_factory
        self.metadata = metadata or {}
        self.owner = None                   # the record class that declares it

    def __repr__(self) -> str:
        return (f"Field(name={self.name!r}, type={self.type!r}, default={self.default!r}, "
                f"default_factory={self.default_factory!r}, metadata={self.metadata!r})")


def field(*, default=MISSING, default_factory=MISSING, metadata=None):
    """A field's default and metadata, as `dataclasses.field` gives them. While the
    dataclasses module is loaded this *is* `dataclasses.field` (a `@dataclass` class body
    needs its Field, and the decorator has imported the module before the body runs);
    `@record` takes either."""
    dc = sys.modules.get("dataclasses")
    if dc is not None:
        kw = {} if metadata is None else {"metadata": metadata}
        if default is not MISSING:
            kw["default"] = default
        if default_factory is not MISSING:
            kw["default_factory"] = default_factory
        return dc.field(**kw)
    return Field(default, default_factory, metadata)


def _spec(value) -> Field:
    """A class attribute as a field's spec: one of ours, a dataclasses.Field, or a plain
    default value."""
    if isinstance(value, Field):
        return value
    dc = sys.modules.get("dataclasses")
    if dc is not None and isinstance(value, dc.Field):
        return Field(value.default if value.default is not dc.MISSING else MISSING,
                     value.default_factory if value.default_factory is not dc.MISSING
                     else MISSING, dict(value.metadata))
    return Field(default=value)


class _DataclassFields:
    """`__dataclass_fields__` on first use: the fields as the dataclasses module has them
    (a dataclass made with the same fields lends its Field objects)."""

    def __get__(self, obj, cls):
        import dataclasses
        specs = []
        for f in cls.__record_fields__:
            kw = {"metadata": f.metadata}
            if f.default is not MISSING:
                kw["default"] = f.default
            if f.default_factory is not MISSING:
                kw["default_factory"] = f.default_factory
            specs.append((f.name, f.type, dataclasses.field(**kw)))
        fields = dataclasses.make_dataclass(cls.__name__, specs).__dataclass_fields__
        cls.__dataclass_fields__ = fields     # in place of this descriptor, on this class
        return fields


def record(cls=None, /, *, frozen: bool = False):
    """Make `cls` a record (see the module's doc); `@record` or `@record(frozen=True)`."""
    if cls is None:
        return lambda c: _make(c, frozen)
    return _make(cls, frozen)


def _make(cls, frozen: bool):
    inherited = [f for base in reversed(cls.__mro__[1:])
                 for f in getattr(base, "__record_fields__", ())]
    own = []
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if isinstance(annotation, str) and annotation.startswith("ClassVar"):
            continue
        spec = _spec(cls.__dict__.get(name, MISSING))
        spec.name, spec.type, spec.owner = name, annotation, cls
        own.append(spec)
        if spec.default is MISSING and name in cls.__dict__:
            delattr(cls, name)           # a factory or a bare spec is no class attribute
        elif spec.default is not MISSING:
            setattr(cls, name, spec.default)
    fields = tuple({f.name: f for f in inherited + own}.values())
    seen_default = False
    for f in fields:
        if f.default is MISSING and f.default_factory is MISSING:
            if seen_default:
                raise TypeError(f"non-default argument {f.name!r} follows default argument")
        else:
            seen_default = True
    cls.__record_fields__ = fields
    cls.__dataclass_fields__ = _DataclassFields()
    cls.__init__ = _initializer(cls, fields)
    cls.__repr__ = _repr
    cls.__eq__ = _eq
    cls.__match_args__ = tuple(f.name for f in fields)
    if frozen:
        cls.__setattr__ = _frozen_setattr
        cls.__delattr__ = _frozen_delattr
        cls.__hash__ = _hash
    else:
        cls.__hash__ = None
    return cls


def _initializer(cls, fields):
    defaults = {f.name: f.default for f in fields if f.default is not MISSING}
    factories = tuple((f.name, f.default_factory) for f in fields
                      if f.default_factory is not MISSING)
    names = tuple(f.name for f in fields)
    required = tuple(f.name for f in fields
                     if f.default is MISSING and f.default_factory is MISSING)
    qualname = cls.__qualname__

    def __init__(self, *args, **kwargs):
        # Attributes go into __dict__ directly (a frozen record has no __setattr__).
        values = self.__dict__
        if not args and not kwargs and not required:      # the codec's case: defaults
            values.update(defaults)
            for name, factory in factories:
                values[name] = factory()
            return
        if len(args) == len(names) and not kwargs:         # every field by position
            values.update(zip(names, args))
        else:
            if len(args) > len(names):
                raise TypeError(f"{qualname}.__init__() takes {len(names) + 1} positional "
                                f"arguments but {len(args) + 1} were given")
            given = dict(zip(names, args))
            for name, value in kwargs.items():
                if name not in names:
                    raise TypeError(f"{qualname}.__init__() got an unexpected keyword "
                                    f"argument {name!r}")
                if name in given:
                    raise TypeError(f"{qualname}.__init__() got multiple values for "
                                    f"argument {name!r}")
                given[name] = value
            missing = [name for name in required if name not in given]
            if missing:
                raise TypeError(f"{qualname}.__init__() missing {len(missing)} required "
                                f"argument(s): {', '.join(repr(m) for m in missing)}")
            values.update(defaults)
            for name, factory in factories:
                if name not in given:
                    values[name] = factory()
            values.update(given)
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    __init__.__qualname__ = f"{qualname}.__init__"
    return __init__


_IN_REPR: set = set()    # (id, thread) of the records being repr'd: reprlib.recursive_repr


def _repr(self) -> str:
    key = id(self), get_ident()
    if key in _IN_REPR:
        return "..."     # a record that holds itself
    _IN_REPR.add(key)
    try:
        return (f"{type(self).__qualname__}("
                + ", ".join(f"{f.name}={getattr(self, f.name)!r}"
                            for f in type(self).__record_fields__) + ")")
    finally:
        _IN_REPR.discard(key)


def _values(self) -> tuple:
    return tuple(getattr(self, f.name) for f in type(self).__record_fields__)


def _eq(self, other):
    if other.__class__ is self.__class__:
        return _values(self) == _values(other)
    return NotImplemented


def _hash(self) -> int:
    return hash(_values(self))


def _frozen_setattr(self, name, value):
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise FrozenInstanceError(f"cannot delete field {name!r}")


# -- records and dataclasses alike, without importing dataclasses -----------------------------
def is_struct(obj) -> bool:
    """A record or dataclass, class or instance."""
    cls = obj if isinstance(obj, type) else type(obj)
    if hasattr(cls, "__record_fields__"):
        return True
    dc = sys.modules.get("dataclasses")   # no dataclass exists unless it is loaded
    return dc is not None and dc.is_dataclass(cls)


def fields(obj) -> tuple:
    """The fields of a record or dataclass (class or instance), in order: objects with
    `name`, `type` and `metadata`."""
    cls = obj if isinstance(obj, type) else type(obj)
    found = cls.__dict__.get("__record_fields__")
    if found is None:
        found = getattr(cls, "__record_fields__", None)
    if found is not None:
        return found
    import dataclasses
    return dataclasses.fields(cls)


def type_hints(cls) -> dict:
    """Each field's annotation resolved: for a record, evaluated in its module (builtins
    only, so typing is not needed); for a dataclass, `typing.get_type_hints`."""
    found = cls.__dict__.get("__record_fields__")
    if found is None:
        import typing
        return typing.get_type_hints(cls, include_extras=True)
    hints = {}
    for f in found:
        if not isinstance(f.type, str):
            hints[f.name] = f.type
            continue
        owner = f.owner
        namespaces = (owner.__dict__, vars(sys.modules[owner.__module__]), vars(builtins))
        try:
            hints[f.name] = _resolve(f.type, namespaces)
        except _Unresolved:
            hints[f.name] = eval(f.type, namespaces[1], namespaces[0])
    return hints


class _Unresolved(Exception):
    pass


_DELIMITERS = "[],|"


def _resolve(text: str, namespaces):
    """An annotation of names, subscripts and `|` (`dict[str, Hook | None] | None`),
    evaluated without compiling it: compile() cost the agent's boot 1.6 ms and 200 KiB
    for its config's annotations. Anything else raises _Unresolved (eval it instead)."""
    if text.isidentifier():        # most are one name (`str`, `Common`): no tokens
        return _name(text, namespaces)
    tokens = []
    word = ""
    for ch in text:
        if ch in _DELIMITERS or ch == " ":
            if word:
                tokens.append(word)
                word = ""
            if ch != " ":
                tokens.append(ch)
        else:
            word += ch
    if word:
        tokens.append(word)
    value, end = _union(tokens, 0, namespaces)
    if end != len(tokens):
        raise _Unresolved(text)
    return value


def _union(tokens, i, namespaces):
    value, i = _term(tokens, i, namespaces)
    while i < len(tokens) and tokens[i] == "|":
        other, i = _term(tokens, i + 1, namespaces)
        value = value | other
    return value, i


def _term(tokens, i, namespaces):
    if i >= len(tokens) or tokens[i] in _DELIMITERS:
        raise _Unresolved(tokens)
    value = _name(tokens[i], namespaces)
    i += 1
    if i < len(tokens) and tokens[i] == "[":
        args = []
        while True:
            arg, i = _union(tokens, i + 1, namespaces)
            args.append(arg)
            if i < len(tokens) and tokens[i] == ",":
                continue
            if i < len(tokens) and tokens[i] == "]":
                break
            raise _Unresolved(tokens)
        value = value[tuple(args) if len(args) > 1 else args[0]]
        i += 1
    return value, i


def _name(word: str, namespaces):
    if word == "None":
        return None
    first, *rest = word.split(".")
    if not first.isidentifier():
        raise _Unresolved(word)
    for namespace in namespaces:
        if first in namespace:
            value = namespace[first]
            break
    else:
        raise _Unresolved(word)        # eval raises the NameError
    for part in rest:
        value = getattr(value, part)
    return value
