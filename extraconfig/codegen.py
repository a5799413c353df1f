"""Generated encode and decode functions for the codec's class plans.

For each struct plan (and the depth and follow state it is reached with) this writes the
work of the plan interpreter (`enc`/`dec` of the nodes in extraconfig/codec.py) out as
straight Python: a struct's key bases are computed once and each field's key is one
concatenation, nested structs are inlined, leaves are parsed by inline expressions, and
a map or slice charges the decode budget once for all its elements. The functions do
exactly what the interpreter does, order of lookups and of sink calls included. They
hand prefixes carrying `@` suffixes (secret and non-persistent subtrees) and node kinds
this module has no writer for back to the interpreter.

When a class switches to generated code is codec.py's business (`_choose`). Debugging:
`source(cls, kind)` returns the source generated for a class (kind "decode", "encode" or
"encode_sink"); EXTRACONFIG_CODEGEN=0 in the environment keeps every call in the
interpreter, EXTRACONFIG_CODEGEN=1 generates on first use.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import codec as C
from . import keys as K
from . import scalars as S
from .gotime import GoTime, format_go, parse_go

ROOT = K.ROOT
ROOT_RO = ROOT + "/"
ROOT_RW = ROOT + "."
# A visible key is ROOT, a separator, then the path: key[HID_CUT:] is its hidden form.
HID_CUT = len(ROOT) + 1

_SOURCES: dict[tuple[type, str], str] = {}


def function(plan: C.StructNode, kind: str) -> Callable[..., Any]:
    """The generated root function of `plan`: decode(get, cur, prefix, spend) ->
    (found, value), encode(out_dict, obj, prefix) or encode_sink(sink, obj, prefix)."""
    unit = (_Decoder if kind == "decode" else _Encoder)(kind)
    name = unit.entry(plan, -1, True)
    namespace, text = unit.build(plan.cls)
    _SOURCES[(plan.cls, kind)] = text
    return namespace[name]


def source(cls: type, kind: str = "decode") -> str:
    """The source generated for `cls` ("decode", "encode" or "encode_sink"), generating
    it if it was not yet."""
    C._generated(C._TABLES[kind], cls, kind)
    return _SOURCES[(cls, kind)]


def _nd(depth: int) -> int:
    """Depths below zero all mean unbounded: one state for code generation."""
    return depth if depth >= 0 else -1


def _too_many(key: str, count: int) -> None:
    raise C.DecodeError(f"{key}: {count} map entries exceed {C.MAX_ELEMENTS}", key)


def _short(key: str, got: int, n: int) -> None:
    bad = key + "~"
    raise C.DecodeError(f"{bad}: {got} values for the length {n} in {key}", bad)


def _flatten(items: list, out: list[str]) -> list[str]:
    for item in items:
        if isinstance(item, list):
            _flatten(item, out)
        else:
            out.append(item)
    return out


# ------------------------------------------------------------------- key contexts

class _Ctx:
    """The bases of one struct's field keys, as local names of the generated code.

    Parts: `ro`/`rw` the read-only and read-write bases (a field's key is base + name),
    `hid` the hidden base, `ub` the untagged fields' base, `P` the struct's own key, and
    any helper a child derives. Each is computed, at the top of the struct's block, only
    once something asks for it. `ub_kind` is "ro" or "rw" when known here, else None."""

    def __init__(self, fn: "_Fn", header: list, ind: str,
                 recipes: dict[str, Callable[[], str]], ub_kind: str | None) -> None:
        self.fn = fn
        self.header = header
        self.ind = ind
        self.recipes = recipes
        self.ub_kind = ub_kind
        self.names: dict[str, str] = {}

    def __getitem__(self, part: str) -> str:
        name = self.names.get(part)
        if name is None:
            expr = self.recipes[part]()
            name = self.names[part] = self.fn.tmp(part.split(":")[0])
            self.header.append(f"{self.ind}{name} = {expr}")
        return name

    def derived(self, label: str, recipe: Callable[[], str]) -> str:
        self.recipes.setdefault(label, recipe)
        return self[label]


class _EntryCtx(_Ctx):
    """An entry function's context: the prologue computes the parts from `P` at run
    time; here we only note which ones the body uses."""

    def __init__(self, fn: "_Fn") -> None:
        super().__init__(fn, [], "    ", {}, None)
        self.needed: set[str] = set()

    def __getitem__(self, part: str) -> str:
        if part in ("ro", "rw", "hid", "ub", "P"):
            self.needed.add(part)
            return part
        return super().__getitem__(part)


class _Key:
    """A key expression; `child_ctx` gives the context of a struct stored at it, when
    its bases follow from the parent's at generation time (else the struct is decoded
    by an entry function, which works them out from the key at run time)."""

    def expr(self) -> str:
        raise NotImplementedError

    def child_ctx(self, header: list, ind: str) -> _Ctx | None:
        return None

    def elem(self, index: str, out: list, ind: str, fn: "_Fn") -> "_Key":
        """The key of slice element `index` (a name): key|index."""
        bar = fn.tmp("kb")
        out.append(f"{ind}{bar} = {self.expr()} + '|'")
        return _DynKey(f"{bar} + str({index})")


class _DynKey(_Key):
    def __init__(self, expr: str) -> None:
        self._expr = expr

    def expr(self) -> str:
        return self._expr


class _FieldKey(_Key):
    """ctx[kind] + name for a read-only or read-write field in a fast context. Its
    children's bases are the parent's plus the name in each separator's form: the
    bases of one context are the same path written with '/' and with '.'."""

    def __init__(self, ctx: _Ctx, kind: str, name: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.n_ro = name.replace(".", "/")
        self.n_rw = name.replace("/", ".")
        self.label = f"{kind}:{name}"

    def expr(self) -> str:
        return f"{self.ctx[self.kind]} + {(self.n_ro if self.kind == 'ro' else self.n_rw)!r}"

    def child_ctx(self, header: list, ind: str) -> _Ctx:
        p = self.ctx
        recipes = {
            "ro": lambda: f"{p['ro']} + {(self.n_ro + '/')!r}",
            "rw": lambda: f"{p['rw']} + {(self.n_rw + '.')!r}",
            "hid": lambda: f"({self.expr()})[{HID_CUT}:] + '/'",
            "P": self.expr,
        }
        return _Ctx(p.fn, header, ind, recipes, self.kind)

    def bar(self) -> str:
        return self.ctx.derived(f"kb:{self.label}", lambda: f"{self.expr()} + '|'")

    def elem(self, index: str, out: list, ind: str, fn: "_Fn") -> "_Key":
        return _ElemKey(self, index)


class _ElemKey(_Key):
    """Element `index` of a slice at a field key: key|index, its bases derived too."""

    def __init__(self, field: _FieldKey, index: str) -> None:
        self.field = field
        self.index = index

    def expr(self) -> str:
        return f"{self.field.bar()} + str({self.index})"

    def child_ctx(self, header: list, ind: str) -> _Ctx:
        f = self.field
        p = f.ctx
        ctx = _Ctx(p.fn, header, ind, {}, f.kind)

        def base(label: str, recipe: Callable[[], str], sep: str) -> Callable[[], str]:
            # the element's base: the field's base + '|' (once per struct) + index + sep
            return lambda: f"{p.derived(f'{label}:{f.label}', recipe)} + {ctx['s']} + {sep!r}"
        ctx.recipes.update({
            "s": lambda: f"str({self.index})",
            "ro": base("bro", lambda: f"{p['ro']} + {(f.n_ro + '|')!r}", "/"),
            "rw": base("brw", lambda: f"{p['rw']} + {(f.n_rw + '|')!r}", "."),
            "hid": base("bh", lambda: f"({f.expr()})[{HID_CUT}:] + '|'", "/"),
            "P": lambda: f"{f.bar()} + {ctx['s']}",
        })
        return ctx


# ------------------------------------------------------------------- functions

class _Fn:
    """Fresh local names within one generated function."""

    def __init__(self) -> None:
        self.count = 0

    def tmp(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"


_LEAVES = (C.Node, C.ScalarNode, C.UintElementNode, C.Float32Node, C.TimeNode, C.BytesNode)


def _field_kind(fp: C.FieldPlan, ctx: _Ctx) -> str | None:
    """How a field's key is made in a fast context (no `@` in the prefix): "ro", "rw",
    "hid", "inh" (untagged, base known only at run time), "slow" (keys.join_key at run
    time), or None when the field has no key (hidden and non-persistent)."""
    name = fp.name
    if fp.untagged:
        if "." in name or "/" in name or "@" in name:
            return "slow"
        return ctx.ub_kind or "inh"
    flags = fp.flags
    if flags & ~C._PLAIN:
        if flags & K.NON_PERSISTENT and flags & K.HIDDEN:
            return None
        return "slow"
    if "@" in name:
        return "slow"
    if flags & K.HIDDEN:
        return "hid"
    return "rw" if flags & K.READ_WRITE else "ro"


class _Unit:
    """One compiled module: the entry functions reachable from a root plan."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ns: dict[str, Any] = {"__builtins__": __builtins__}
        self.consts: dict[int, str] = {}
        self.entries: dict[tuple[C.StructNode, int, bool], str] = {}
        self.todo: list[tuple[C.StructNode, int, bool, str]] = []
        self.inlining: set[C.StructNode] = set()

    def const(self, value: Any, stem: str) -> str:
        name = self.consts.get(id(value))
        if name is None:
            name = self.consts[id(value)] = f"{stem}_{len(self.consts)}"
            self.ns[name] = value
        return name

    def field_key(self, fp: C.FieldPlan, kind: str, ctx: _Ctx) -> _Key:
        """The key of field `fp` in context `ctx`; `kind` is _field_kind's (not None).
        Asking for a part of `ctx` makes the generated code compute it."""
        if kind in ("ro", "rw"):
            return _FieldKey(ctx, kind, fp.name)
        if kind == "hid":
            return _DynKey(f"{ctx['hid']} + {fp.name!r}")
        if kind == "inh":
            return _DynKey(f"{ctx['ub']} + {fp.name!r}")
        return _DynKey(f"{self.const(C._field_key, 'FKEY')}({ctx['P']}, "
                       f"{self.const(fp, 'FP')})")

    def entry(self, plan: C.StructNode, depth: int, follow: bool) -> str:
        key = (plan, _nd(depth), follow)
        name = self.entries.get(key)
        if name is None:
            name = self.entries[key] = f"{self.kind[0]}_{plan.cls.__name__}_{len(self.entries)}"
            self.todo.append((plan, _nd(depth), follow, name))
        return name

    def build(self, cls: type) -> tuple[dict[str, Any], str]:
        lines: list[str] = [f"# extraconfig {self.kind} for {cls.__module__}.{cls.__qualname__}"]
        while self.todo:
            plan, depth, follow, name = self.todo.pop(0)
            lines += [""] + _flatten(self.entry_function(plan, depth, follow, name), [])
        text = "\n".join(lines) + "\n"
        code = compile(text, f"<extraconfig {self.kind} {cls.__qualname__}>", "exec")
        exec(code, self.ns)
        return self.ns, text

    def entry_function(self, plan, depth, follow, name) -> list:
        raise NotImplementedError

    def prologue(self, ctx: _EntryCtx, fallback: str) -> list[str]:
        """Bases from the prefix `P`, as codec._struct_keys computes them; prefixes it
        sends down its slow path go to `fallback` (the interpreter)."""
        need = set(ctx.needed)
        if "ub" in need:
            need |= {"ro", "rw"}
        vis, empty, other = [], [], []
        if need & {"ro", "rw"}:
            vis.append(f"t = P[{len(ROOT)}:]")
        if "ro" in need:
            vis.append(f"ro = {ROOT!r} + t.replace('.', '/') + '/'")
            empty.append(f"ro = {ROOT_RO!r}")
            other.append(f"ro = {ROOT_RO!r} + P.replace('.', '/') + '/'")
        if "rw" in need:
            vis.append(f"rw = {ROOT!r} + t.replace('/', '.') + '.'")
            empty.append(f"rw = {ROOT_RW!r}")
            other.append(f"rw = {ROOT_RW!r} + P.replace('/', '.') + '.'")
        if "hid" in need:
            vis.append(f"hid = (P + '/')[{HID_CUT}:]")
            empty.append("hid = ''")
            other.append("hid = P + '/'")
        if "ub" in need:
            vis.append("ub = ro if '/' in P else rw")
            empty.append("ub = ''")
            other.append("ub = P + '/'")
        out = [f"    if P.startswith({ROOT!r}):",
               "        if '@' in P:",
               f"            {fallback}"]
        out += ["        " + line for line in vis]
        out += ["    elif not P:"] + ["        " + line for line in empty or ["pass"]]
        out += ["    elif '@' in P or P.startswith('guestinfo.'):", f"        {fallback}"]
        out += ["    else:"] + ["        " + line for line in other or ["pass"]]
        return out


# ------------------------------------------------------------------------ decode

class _Decoder(_Unit):
    """decode entry: f(get, cur, P, sp) -> (found, obj), as StructNode.dec(get, cur, P,
    depth, follow, sp)."""

    def entry_function(self, plan, depth, follow, name) -> list:
        fn = _Fn()
        ctx = _EntryCtx(fn)
        body: list = []
        cls = self.const(plan.cls, "C")
        body += ["    o = cur", "    if o is None:", f"        o = {cls}()", "    fd = False"]
        self.inlining.add(plan)
        self.struct_fields(plan, "o", ctx, "fd", depth, follow, body, "    ", fn)
        self.inlining.discard(plan)
        body.append("    return fd, o")
        fallback = f"return {self.const(plan, 'PLAN')}.dec(get, cur, P, {depth}, {follow}, sp)"
        return ([f"def {name}(get, cur, P, sp):"] + self.prologue(ctx, fallback) + [ctx.header]
                + body)

    # -- structs

    def struct_fields(self, plan, o, ctx, fv, depth, follow, out, ind, fn) -> None:
        dd = _nd(depth - 1)
        for fp in plan.fields:
            kind = _field_kind(fp, ctx)
            if kind is None:
                continue
            if fp.skip_decode:
                out.append(f"{ind}{fv} = True")
                continue
            fdepth = dd if fp.depth is None else _nd(fp.depth)
            ffollow = follow if fp.follow is None else fp.follow
            key = self.field_key(fp, kind, ctx)
            attr = fp.attr
            store = (lambda e, a=attr: f"{o}.{a} = {e}")
            if kind == "slow" and type(fp.node) not in _LEAVES:
                # a key with an `@` suffix: what goes below it is spliced in before the
                # suffix (keys.append), which only the interpreter does
                self.generic(fp.node, key, f"{o}.{attr}", store, fv, fdepth, ffollow, out, ind, fn)
                continue
            self.node(fp.node, key, f"{o}.{attr}", store, fv, fdepth, ffollow, out, ind, fn)

    def struct(self, plan, key: _Key, cur, store, fv, depth, follow, out, ind, fn,
               pointer: bool) -> None:
        """StructNode.dec; `pointer`: as the pointee of a PointerNode (stored only when
        found or already there; the pointer itself always counts as found)."""
        cls = self.const(plan.cls, "C")
        o = fn.tmp("o")
        header: list = []
        ctx = key.child_ctx(header, ind) if plan not in self.inlining else None
        if ctx is None:
            entry = self.entry(plan, depth, follow)
            fo = fn.tmp("f")
            if pointer:
                c = fn.tmp("c")
                out.append(f"{ind}{c} = {cur}")
                out.append(f"{ind}{fo}, {o} = {entry}(get, {c}, {key.expr()}, sp)")
                out.append(f"{ind}if {fo} and {c} is None:")
                out.append(f"{ind}    {store(o)}")
                out.append(f"{ind}{fv} = True")
            else:
                out.append(f"{ind}{fo}, {o} = {entry}(get, {cur}, {key.expr()}, sp)")
                out.append(f"{ind}{store(o)}")
                out.append(f"{ind}if {fo}:")
                out.append(f"{ind}    {fv} = True")
            return
        if pointer:
            c = fn.tmp("c")
            fo = fn.tmp("f")
            out += [f"{ind}{c} = {o} = {cur}", f"{ind}if {o} is None:", f"{ind}    {o} = {cls}()",
                    f"{ind}{fo} = False"]
        else:
            fo = fv
            out += [f"{ind}{o} = {cur}", f"{ind}if {o} is None:", f"{ind}    {o} = {cls}()",
                    f"{ind}    {store(o)}"]
        out.append(header)
        self.inlining.add(plan)
        self.struct_fields(plan, o, ctx, fo, depth, follow, out, ind, fn)
        self.inlining.discard(plan)
        if pointer:
            out += [f"{ind}if {fo} and {c} is None:", f"{ind}    {store(o)}", f"{ind}{fv} = True"]

    # -- any node

    def node(self, node, key: _Key, cur, store, fv, depth, follow, out, ind, fn) -> None:
        """Code doing node.dec(get, cur, key, depth, follow, sp): `store(expr)` makes the
        statement that sets the result where it belongs (only emitted when the result
        can differ from `cur`), and `fv` (a name, or None) is set True when found."""
        t = type(node)
        if depth == 0 or t is C.Node:
            if fv:
                out.append(f"{ind}{fv} = True")
        elif t is C.Float32Node:
            k = fn.tmp("k")
            out += [f"{ind}{k} = {key.expr()}", f"{ind}if get({k}) is not None:",
                    f"{ind}    raise {self.const(C.DecodeError, 'DE')}({k} + "
                    f"': a float32 field cannot be decoded (the reference panics)', {k})"]
        elif t in (C.ScalarNode, C.UintElementNode, C.TimeNode, C.BytesNode):
            self.leaf(node, key, store, fv, out, ind)
        elif t is C.PointerNode:
            self.pointer(node, key, cur, store, fv, depth, follow, out, ind, fn)
        elif t is C.StructNode:
            self.struct(node, key, cur, store, fv or fn.tmp("f"), depth, follow, out, ind, fn,
                        pointer=False)
        elif t is C.SliceNode and not node.array and node.mode != "unsupported":
            self.slice(node, key, cur, store, fv, depth, follow, out, ind, fn)
        elif t is C.MapNode:
            self.map(node, key, cur, store, fv, depth, follow, out, ind, fn)
        else:
            self.generic(node, key, cur, store, fv, depth, follow, out, ind, fn)

    def generic(self, node, key, cur, store, fv, depth, follow, out, ind, fn) -> None:
        fo, v = fn.tmp("f"), fn.tmp("v")
        out.append(f"{ind}{fo}, {v} = {self.const(node, 'N')}.dec(get, {cur}, {key.expr()}, "
                   f"{depth}, {follow}, sp)")
        out.append(f"{ind}{store(v)}")
        if fv:
            out += [f"{ind}if {fo}:", f"{ind}    {fv} = True"]

    def parse_expr(self, node, v: str) -> str:
        """The value of leaf text `v` (a name), as node.dec / node.parse make it."""
        t = type(node)
        if t is C.TimeNode:
            return f"({self.const(parse_go, 'PG')}({v}) or {self.const(GoTime, 'GT')}())"
        kind = node.kind
        if t is C.ScalarNode and kind == "string":
            return v
        if t is C.ScalarNode and kind == "int":
            # parse_int's common case inline: up to 18 ASCII digits always fit in int64
            return (f"(int({v}) if {v}.isdigit() and {v}.isascii() and len({v}) < 19 "
                    f"else {self.const(S.parse_int, 'PI')}({v}))")
        if t is C.ScalarNode and kind == "bool":
            return f"({v} in {self.const(S.TRUE_WORDS, 'TW')})"
        return f"{self.const(node._parse, 'PARSE')}({v})"

    def leaf(self, node, key, store, fv, out, ind) -> None:
        out.append(f"{ind}v = get({key.expr()})")
        out.append(f"{ind}if v is not None:")
        if type(node) is C.BytesNode:
            out += [f"{ind}    v = {self.const(S.parse_bytes, 'PB')}(v)",
                    f"{ind}    if v is not None:"]
            if fv:
                out.append(f"{ind}        {fv} = True")
            out.append(f"{ind}        {store(self.const(node.cls, 'B') + '(v)')}")
            return
        if fv:
            out.append(f"{ind}    {fv} = True")
        out.append(f"{ind}    {store(self.parse_expr(node, 'v'))}")

    def pointer(self, node, key, cur, store, fv, depth, follow, out, ind, fn) -> None:
        inner = node.inner
        t = type(inner)
        if not follow:
            if fv:
                out.append(f"{ind}{fv} = True")
            return
        if t is C.StructNode and _nd(depth - 1) != 0:
            self.struct(inner, key, cur, store, fv or fn.tmp("f"), _nd(depth - 1), follow, out,
                        ind, fn, pointer=True)
            return
        if t in (C.ScalarNode, C.UintElementNode, C.TimeNode, C.BytesNode, C.Float32Node,
                 C.Node) or _nd(depth - 1) == 0:
            # not found: the value stays what it was (None stays None)
            self.node(inner, key, cur, store, None, _nd(depth - 1), follow, out, ind, fn)
            if fv:
                out.append(f"{ind}{fv} = True")
            return
        self.generic(node, key, cur, store, fv, depth, follow, out, ind, fn)

    def charge(self, k: str, n: str, per: int, out: list, ind: str) -> None:
        """Spend.charge(k, n, n * per), inline."""
        out.append(f"{ind}sp.entries -= {n}")
        if per:
            out.append(f"{ind}sp.lookups -= {n} * {per}")
            out.append(f"{ind}if sp.entries < 0 or sp.lookups < 0:")
        else:
            out.append(f"{ind}if sp.entries < 0:")
        out.append(f"{ind}    sp.exceeded({k}, {n}, {n} * {per})")

    def slice(self, node, key, cur, store, fv, depth, follow, out, ind, fn) -> None:
        elem = node.elem
        de = _nd(depth - 1)
        k, t, n = fn.tmp("k"), fn.tmp("t"), fn.tmp("n")
        out += [f"{ind}{k} = {key.expr()}",
                f"{ind}{t} = get({k})",
                f"{ind}if not {t}:",
                f"{ind}    {n} = 0",
                f"{ind}elif {t}.isdigit() and {t}.isascii() and len({t}) < 5:",
                f"{ind}    {n} = int({t}) + 1",
                f"{ind}else:",
                f"{ind}    {n} = {self.const(node, 'SL')}._length({t}, {k})"]
        indexed = node.mode == "indexed"
        per = C.static_lookups(elem, de, follow) if indexed else 0
        out.append(f"{ind}if {n}:")
        self.charge(k, n, per, out, ind + "    ")
        if indexed:
            self.indexed(node, key, k, n, cur, store, fv, de, follow, out, ind, fn)
            return
        j, ps, c, b, fo = fn.tmp("j"), fn.tmp("ps"), fn.tmp("c"), fn.tmp("b"), fn.tmp("f")
        if type(elem) is C.ScalarNode and elem.kind == "string":
            values = ps
        elif type(elem) is C.ScalarNode and elem.kind in ("int", "bool"):
            values = f"[{self.parse_expr(elem, 'p')} for p in {ps}]"
        else:
            values = f"[{self.const(elem.parse, 'EP')}(p, {k}) for p in {ps}]"
        out += [f"{ind}{j} = get({k} + '~')",
                f"{ind}if {j} is not None:"]
        if fv:
            out.append(f"{ind}    {fv} = True")
        out += [f"{ind}    if {n}:",
                f"{ind}        {ps} = {j}.split('|', {n})",
                f"{ind}        if len({ps}) < {n}:",
                f"{ind}            {self.const(_short, 'SHORT')}({k}, len({ps}), {n})",
                f"{ind}        del {ps}[{n}:]",
                f"{ind}        {store(values)}",
                f"{ind}    else:",
                f"{ind}        {store('[]')}",
                f"{ind}else:",
                f"{ind}    {c} = {cur}",
                f"{ind}    {b} = list({c}[:{n}]) if {c} is not None and {n} <= len({c}) "
                f"else [{self.const(elem.zero(), 'Z')}] * {n}",
                f"{ind}    {fo}, {b} = {self.const(node, 'SL')}.indexed_values(get, {k}, {b}, sp)",
                f"{ind}    {store(b)}"]
        if fv:
            out += [f"{ind}    if {fo}:", f"{ind}        {fv} = True"]

    def indexed(self, node, key, k, n, cur, store, fv, de, follow, out, ind, fn) -> None:
        c, r, lst, i, pr, fe, it = (fn.tmp(s) for s in ("c", "r", "l", "i", "pr", "fe", "it"))
        ekey = key.elem(i, out, ind, fn)
        out += [f"{ind}{c} = {cur}",
                f"{ind}{r} = {c} is not None and {n} <= len({c})",
                f"{ind}{lst} = []",
                f"{ind}for {i} in range({n}):",
                f"{ind}    {pr} = {c}[{i}] if {r} else None",
                f"{ind}    {fe} = False",
                f"{ind}    {it} = {pr}"]
        self.node(node.elem, ekey, pr, lambda e: f"{it} = {e}", fe, de, follow, out,
                  ind + "    ", fn)
        out += [f"{ind}    if not {fe}:",
                f"{ind}        {it} = {pr} if {r} else {self.const(node.elem.zero, 'ZE')}()",
                f"{ind}    {lst}.append({it})",
                f"{ind}{store(lst)}"]
        if fv:
            out.append(f"{ind}{fv} = True")

    def map(self, node, key, cur, store, fv, depth, follow, out, ind, fn) -> None:
        vnode = node.value
        vt = type(vnode)
        de = _nd(depth - 1)
        k, m, t, names, x = (fn.tmp(s) for s in ("k", "m", "t", "names", "x"))
        out += [f"{ind}{k} = {key.expr()}",
                f"{ind}{m} = {cur}",
                f"{ind}if {m} is None:",
                f"{ind}    {m} = {{}}",
                f"{ind}    {store(m)}",
                f"{ind}{t} = get({k})",
                f"{ind}if {t} is not None:"]
        if fv:
            out.append(f"{ind}    {fv} = True")
        i2, i3 = ind + "        ", ind + "            "
        per = C.static_lookups(vnode, de, follow)
        out += [f"{ind}    if {t}:",
                f"{i2}{names} = {t}.split('|')",
                f"{i2}if len({names}) > {C.MAX_ELEMENTS}:",
                f"{i2}    {self.const(_too_many, 'TOO_MANY')}({k}, len({names}))",
                f"{i2}if len(set({names})) != len({names}):",
                f"{i2}    {self.const(C._duplicate, 'DUP')}({names}, {k})"]
        self.charge(k, f"len({names})", per, out, i2)
        bar = fn.tmp("kb")
        out += [f"{i2}{bar} = {k} + '|'", f"{i2}for {x} in {names}:"]
        kn = node.keynode
        if type(kn) is C.ScalarNode and kn.kind == "string":
            kk = x
        else:
            kk = fn.tmp("kk")
            out.append(f"{i3}{kk} = {self.const(kn.parse, 'KP')}({x}, {k})")
        ekey = f"{bar} + {x}"
        fo, o, c = fn.tmp("f"), fn.tmp("o"), fn.tmp("c")
        if vt is C.StructNode and de != 0:
            entry = self.entry(vnode, de, follow)
            out += [f"{i3}{fo}, {o} = {entry}(get, None, {ekey}, sp)",
                    f"{i3}if {fo}:", f"{i3}    {m}[{kk}] = {o}"]
        elif vt is C.PointerNode and type(vnode.inner) is C.StructNode and de != 0 and follow \
                and _nd(de - 1) != 0:
            entry = self.entry(vnode.inner, _nd(de - 1), follow)
            out += [f"{i3}{c} = {m}.get({kk})",
                    f"{i3}{fo}, {o} = {entry}(get, {c}, {ekey}, sp)",
                    f"{i3}{m}[{kk}] = {o} if {fo} or {c} is not None else None"]
        elif vt in (C.ScalarNode, C.TimeNode, C.BytesNode) and de != 0:
            self.leaf(vnode, _DynKey(ekey), lambda e: f"{m}[{kk}] = {e}", None, out, i3)
        elif vnode.kind in ("pointer", "slice", "map"):
            out.append(f"{i3}_, {m}[{kk}] = {self.const(vnode, 'N')}.dec(get, {m}.get({kk}), "
                       f"{ekey}, {de}, {follow}, sp)")
        else:
            # as MapNode.dec: a struct entry is always rebuilt, others start from the entry
            start = "None" if vnode.kind == "struct" else f"{m}.get({kk})"
            out += [f"{i3}{fo}, {o} = {self.const(vnode, 'N')}.dec(get, {start}, {ekey}, "
                    f"{de}, {follow}, sp)",
                    f"{i3}if {fo}:", f"{i3}    {m}[{kk}] = {o}"]


# ------------------------------------------------------------------------ encode

class _Encoder(_Unit):
    """encode entry: f(out, obj, P) as StructNode.enc(sink, obj, P, depth, follow); `out`
    is a dict ("encode") or a sink function ("encode_sink")."""

    def put(self, k: str, v: str) -> str:
        return f"out[{k}] = {v}" if self.kind == "encode" else f"out({k}, {v})"

    def sink_expr(self) -> str:
        return "out.__setitem__" if self.kind == "encode" else "out"

    def entry_function(self, plan, depth, follow, name) -> list:
        fn = _Fn()
        ctx = _EntryCtx(fn)
        body: list = []
        self.inlining.add(plan)
        self.struct_fields(plan, "o", ctx, depth, follow, body, "    ", fn)
        self.inlining.discard(plan)
        fallback = (f"return {self.const(plan, 'PLAN')}.enc({self.sink_expr()}, o, P, "
                    f"{depth}, {follow})")
        return ([f"def {name}(out, o, P):", "    if o is None:", "        return"]
                + self.prologue(ctx, fallback) + [ctx.header] + (body or ["    pass"]))

    def struct_fields(self, plan, o, ctx, depth, follow, out, ind, fn) -> None:
        dd = _nd(depth - 1)
        for fp in plan.fields:
            kind = _field_kind(fp, ctx)
            if kind is None or fp.skip_encode:
                continue
            fdepth = dd if fp.depth is None else _nd(fp.depth)
            ffollow = follow if fp.follow is None else fp.follow
            key = self.field_key(fp, kind, ctx)
            if kind == "slow" and type(fp.node) not in _LEAVES:
                if fdepth != 0:       # an `@` suffix: the interpreter splices keys below it
                    out.append(f"{ind}{self.const(fp.node, 'N')}.enc({self.sink_expr()}, "
                               f"{o}.{fp.attr}, {key.expr()}, {fdepth}, {ffollow})")
                continue
            self.node(fp.node, key, f"{o}.{fp.attr}", fdepth, ffollow, out, ind, fn)

    def fmt_expr(self, node, x: str) -> str:
        t = type(node)
        if t is C.TimeNode:
            return f"{self.const(format_go, 'FG')}({x})"
        if t is C.ScalarNode and node.kind == "string":
            return x
        if t is C.ScalarNode and node.kind == "int":
            return f"(str({x}) if {x}.__class__ is int else {self.const(S.format_int, 'FI')}({x}))"
        if t is C.ScalarNode and node.kind == "bool":
            return f"('true' if {x} else 'false')"
        return f"{self.const(node._fmt, 'FMT')}({x})"

    def node(self, node, key: _Key, value: str, depth, follow, out, ind, fn) -> None:
        """Code doing node.enc(sink, value, key, depth, follow); `value` is evaluated once."""
        t = type(node)
        if depth == 0 or t is C.Node:
            return
        if t in (C.ScalarNode, C.UintElementNode, C.Float32Node, C.TimeNode):
            x = fn.tmp("x")
            out.append(f"{ind}{x} = {value}")
            out.append(f"{ind}{self.put(key.expr(), self.fmt_expr(node, x))}")
        elif t is C.BytesNode:
            x = fn.tmp("x")
            out += [f"{ind}{x} = {value}", f"{ind}if {x}:",
                    f"{ind}    {self.put(key.expr(), self.const(S.format_bytes, 'FB') + f'({x})')}"]
        elif t is C.PointerNode:
            if not follow:
                return
            x = fn.tmp("x")
            out += [f"{ind}{x} = {value}", f"{ind}if {x} is not None:"]
            self.node(node.inner, key, x, _nd(depth - 1), follow, out, ind + "    ", fn)
            if out[-1] == f"{ind}if {x} is not None:":
                out.append(f"{ind}    pass")
        elif t is C.StructNode:
            self.struct(node, key, value, depth, follow, out, ind, fn)
        elif t is C.SliceNode:
            self.slice(node, key, value, depth, follow, out, ind, fn)
        elif t is C.MapNode:
            self.map(node, key, value, depth, follow, out, ind, fn)
        else:
            out.append(f"{ind}{self.const(node, 'N')}.enc({self.sink_expr()}, {value}, "
                       f"{key.expr()}, {depth}, {follow})")

    def struct(self, plan, key: _Key, value, depth, follow, out, ind, fn) -> None:
        header: list = []
        ctx = key.child_ctx(header, ind + "    ") if plan not in self.inlining else None
        if ctx is None:
            out.append(f"{ind}{self.entry(plan, depth, follow)}(out, {value}, {key.expr()})")
            return
        x = fn.tmp("x")
        out += [f"{ind}{x} = {value}", f"{ind}if {x} is not None:", header]
        mark = len(out)
        self.inlining.add(plan)
        self.struct_fields(plan, x, ctx, depth, follow, out, ind + "    ", fn)
        self.inlining.discard(plan)
        if len(out) == mark and not header:
            out.append(f"{ind}    pass")

    def slice(self, node, key: _Key, value, depth, follow, out, ind, fn) -> None:
        if node.mode == "unsupported":
            return
        elem = node.elem
        de = _nd(depth - 1)
        x, i = fn.tmp("x"), fn.tmp("i")
        out += [f"{ind}{x} = {value}", f"{ind}if {x}:"]
        i2 = ind + "    "
        k = fn.tmp("k")
        out.append(f"{i2}{k} = {key.expr()}")
        if node.mode == "indexed":
            e = fn.tmp("e")
            ekey = key.elem(i, out, i2, fn)
            out.append(f"{i2}for {i}, {e} in enumerate({x}):")
            mark = len(out)
            self.node(elem, ekey, e, de, follow, out, i2 + "    ", fn)
            if len(out) == mark:
                out.append(f"{i2}    pass")
        else:
            ts, j = fn.tmp("ts"), fn.tmp("j")
            if type(elem) is C.ScalarNode and elem.kind == "string":
                out.append(f"{i2}{ts} = {x}")
            else:
                out.append(f"{i2}{ts} = [{self.fmt_expr(elem, 'e')} for e in {x}]")
            # one joined value, unless an element holds '|' (then the indexed form)
            out += [f"{i2}{j} = '|'.join({ts})",
                    f"{i2}if {j}.count('|') == len({ts}) - 1:",
                    f"{i2}    {self.put(k + ' + ' + repr('~'), j)}",
                    f"{i2}else:",
                    f"{i2}    for {i}, {j} in enumerate({ts}):",
                    f"{i2}        {self.put(k + ' + ' + repr('|') + f' + str({i})', j)}"]
        out.append(f"{i2}{self.put(k, f'str(len({x}) - 1)')}")

    def map(self, node, key: _Key, value, depth, follow, out, ind, fn) -> None:
        vnode = node.value
        vt = type(vnode)
        de = _nd(depth - 1)
        x, k, bar, t, e, ts = (fn.tmp(s) for s in ("x", "k", "kb", "t", "e", "ts"))
        i2, i3 = ind + "    ", ind + "        "
        out += [f"{ind}{x} = {value}", f"{ind}if {x}:",
                f"{i2}{k} = {key.expr()}", f"{i2}{bar} = {k} + '|'"]
        kn = node.keynode
        string_keys = type(kn) is C.ScalarNode and kn.kind == "string"
        if string_keys:
            out.append(f"{i2}for {t}, {e} in {x}.items():")
        else:
            out += [f"{i2}{ts} = []", f"{i2}for {t}, {e} in {x}.items():",
                    f"{i3}{t} = {self.const(kn.fmt, 'KF')}({t})", f"{i3}{ts}.append({t})"]
        ekey = _DynKey(f"{bar} + {t}")
        mark = len(out)
        if vt is C.StructNode and de != 0:
            out.append(f"{i3}{self.entry(vnode, de, follow)}(out, {e}, {ekey.expr()})")
        elif vt is C.PointerNode and type(vnode.inner) is C.StructNode and de != 0 and follow:
            if _nd(de - 1) != 0:
                out.append(f"{i3}{self.entry(vnode.inner, _nd(de - 1), follow)}(out, {e}, "
                           f"{ekey.expr()})")
        else:
            self.node(vnode, ekey, e, de, follow, out, i3, fn)
        if len(out) == mark:
            out.append(f"{i3}pass")
        joined = f"'|'.join(sorted({x}))" if string_keys else f"'|'.join(sorted({ts}))"
        out.append(f"{i2}{self.put(k, joined)}")
