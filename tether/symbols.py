"""`Symbols`: a closed set of named constants, for what the agent would use enum.Enum for.

Importing enum costs PID 1 several milliseconds on every boot (it pulls in functools and
collections) before its primary runs. A subclass lists its members as upper-case class
attributes holding their values; each becomes an instance of the subclass with `.name`
and `.value`, compared with `is`, iterable in order on the class, hashable, and kept as
itself by copy and pickle:

    class Phase(Symbols):
        CREATED = "created"
        RUNNING = "running"

    Phase.RUNNING.value == "running"; list(Phase) == [Phase.CREATED, Phase.RUNNING]
"""
from __future__ import annotations


class _SymbolsType(type):
    def __iter__(cls):
        return iter(cls._members)

    def __len__(cls) -> int:
        return len(cls._members)


class Symbols(metaclass=_SymbolsType):
    __slots__ = ("name", "value")
    _members: tuple = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        members = []
        for name, value in list(vars(cls).items()):
            if name.isupper() and not name.startswith("_"):
                member = object.__new__(cls)
                member.name, member.value = name, value
                setattr(cls, name, member)
                members.append(member)
        cls._members = tuple(members)

    def __new__(cls, value):
        """The member with this value (as `Enum(value)`); ValueError if there is none."""
        for member in cls._members:
            if member.value == value:
                return member
        raise ValueError(f"{value!r} is not a valid {cls.__qualname__}")

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__}.{self.name}: {self.value!r}>"

    def __reduce__(self):
        return getattr, (type(self), self.name)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self
