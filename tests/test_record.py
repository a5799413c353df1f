"""Records (extraconfig/record.py) behave as the dataclasses they replace in the config
model, are dataclasses to the dataclasses module, and are made without importing it."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import typing

import pytest

from helpers import REPO
from extraconfig.record import FrozenInstanceError, field, fields, is_struct, record, type_hints
from extraconfig.schema import tag_of, vic


def make_pair(frozen: bool = False):
    """The same declaration as a record and as a dataclass."""
    def declare(decorate):
        @decorate
        class Point:
            x: int
            y: int = 0
            tags: list[str] | None = field(default_factory=list)
            name: str = vic("Name", "read-only", "name", default="p")
        return Point
    return (declare(record(frozen=frozen)),
            declare(dataclasses.dataclass(frozen=frozen)))


@pytest.mark.parametrize("args, kwargs", [((1,), {}), ((1, 2), {}), ((), {"x": 3}),
                                          ((1,), {"name": "q", "tags": ["a"]}),
                                          ((1, 2, ["t"], "n"), {})])
def test_construction_equality_and_repr_are_the_dataclasses(args, kwargs):
    rec, dc = make_pair()
    a, b = rec(*args, **kwargs), dc(*args, **kwargs)
    assert [getattr(a, f.name) for f in fields(rec)] == \
        [getattr(b, f.name) for f in dataclasses.fields(dc)]
    assert repr(a).replace("make_pair.<locals>.declare.<locals>.", "") == \
        repr(b).replace("make_pair.<locals>.declare.<locals>.", "")
    assert a == rec(*args, **kwargs) and a != rec(99)
    assert rec.__hash__ is None and dc.__hash__ is None


def test_factories_give_each_instance_its_own_value():
    rec, _ = make_pair()
    a, b = rec(1), rec(1)
    a.tags.append("x")
    assert b.tags == []

    @record
    class Defaults:          # made with no arguments, as the codec makes them
        tags: list[str] = field(default_factory=list)
        count: int = 3
    c, d = Defaults(), Defaults()
    c.tags.append("x")
    assert (d.tags, d.count) == ([], 3)


@pytest.mark.parametrize("args, kwargs", [((), {}), ((1, 2, [], "n", 5), {}),
                                          ((1,), {"x": 2}), ((1,), {"z": 2})])
def test_bad_arguments_are_refused_like_the_dataclasses(args, kwargs):
    rec, dc = make_pair()
    with pytest.raises(TypeError):
        dc(*args, **kwargs)
    with pytest.raises(TypeError):
        rec(*args, **kwargs)


def test_frozen_records_are_immutable_and_hash_like_the_dataclasses():
    rec, dc = make_pair(frozen=True)
    a = rec(1, 2, None)
    with pytest.raises(FrozenInstanceError):
        a.x = 5
    with pytest.raises(AttributeError):
        del a.y
    assert hash(a) == hash(dc(1, 2, None)) and hash(a) == hash(rec(1, 2, None))


def test_a_record_is_a_dataclass_to_the_dataclasses_module():
    rec, dc = make_pair()
    assert dataclasses.is_dataclass(rec) and dataclasses.is_dataclass(rec(1))
    got = [(f.name, f.type, f.default, f.default_factory, dict(f.metadata))
           for f in dataclasses.fields(rec)]
    want = [(f.name, f.type, f.default, f.default_factory, dict(f.metadata))
            for f in dataclasses.fields(dc)]
    assert got == want
    assert tag_of(dataclasses.fields(rec)[3]).go_name == "Name"
    a = rec(1, tags=["t"])
    assert dataclasses.asdict(a) == dataclasses.asdict(dc(1, tags=["t"]))
    assert dataclasses.replace(a, y=7) == rec(1, 7, ["t"])
    assert is_struct(rec) and is_struct(dc(1)) and not is_struct(1)


def test_the_config_models_annotations_resolve_as_typing_resolves_them():
    from tether import config, extension
    from extraconfig import types
    models = [v for m in (config, extension, types) for v in vars(m).values()
              if isinstance(v, type) and "__record_fields__" in vars(v)]
    assert config.ExecutorConfig in models and len(models) > 15
    for cls in models:
        assert type_hints(cls) == typing.get_type_hints(cls), cls


NO_DATACLASSES = textwrap.dedent("""
    import sys
    from extraconfig.record import Field, record
    from extraconfig.schema import vic
    assert isinstance(vic("X", default=1), Field)
    from extraconfig.codec import decode, encode
    from tether.config import Cmd, Common, ExecutorConfig, SessionConfig
    s = SessionConfig(common=Common(id="a"), cmd=Cmd(path="/x", args=["/x"]))
    c = ExecutorConfig(common=Common(id="a"), sessions={"a": s})
    d = decode(encode(c), ExecutorConfig)
    assert d.sessions["a"].cmd.args == ["/x"] and encode(d) == encode(c)
    print(sorted(m for m in ("dataclasses", "typing", "inspect") if m in sys.modules))
""")


def test_records_and_the_codec_work_without_importing_dataclasses():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-S", "-c", NO_DATACLASSES], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]


def test_a_record_that_holds_itself_has_the_dataclass_repr():
    """recursive_repr's '...' where a record reaches itself, as a dataclass's repr gives."""
    ours, theirs = make_pair()
    a, b = ours(1), theirs(1)
    a.tags, b.tags = [a], [b]
    assert repr(a) == repr(b).replace(theirs.__qualname__, ours.__qualname__)
    assert "..." in repr(a)
