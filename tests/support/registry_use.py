"""Which tests can open the server's registry: the PostgreSQL pass runs those, and only those, again.

A test can open a registry through ``$EDGEFLEET_REGISTRY_URL`` only by reaching
``server.registry.db.open_database`` (every registry, catalog and CLI command opens it there). This module
decides that statically, without running anything: from the test function and every fixture in its
closure it follows what their code can reach, transitively through the project's own code (``tests``,
``server``, ``scripts``): the names a code object uses that its module's globals bind (functions, classes
and all their methods, modules' attributes, the values of dicts and tuples), nested code, and the
processes it starts (``python -m M``: all of ``M``'s main module; ``python -c CODE``: what CODE
imports). Names it cannot resolve (attributes of values) are covered by scanning every method of every
class reached, so the answer errs towards "reaches": an unneeded test costs time, a missed one coverage.

The miss the other way is checked at run time: ``tests/conftest.py`` runs each test classified as
registry-free with ``$EDGEFLEET_REGISTRY_URL`` naming a database that cannot exist
(``REGISTRY_FREE_URL``), in both passes; a test that opens a registry anyway fails with that URL in
its error, so a wrong classification cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import dis
import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Iterable, Iterator
from functools import partial as functools_partial
from pathlib import Path
from typing import Any

import pytest

#: the URL registry-free tests run with: opening a registry there fails at once, saying why
REGISTRY_FREE_URL = ("postgresql:///test_classified_registry_free_yet_opened_a_registry"
                     "?host=/nonexistent/see-tests-support-registry_use.py&connect_timeout=2")

#: where the PostgreSQL pass selects (the rest of a selection runs as asked)
SCOPE = ("tests/integration/", "tests/faults/")

_OURS = ("tests", "server", "scripts")


def _ours(module: str | None) -> bool:
    return bool(module) and (module or "").split(".", 1)[0] in _OURS


class RegistryReach:
    """``reach = RegistryReach(); reach.touches(item)`` for each collected test (results shared)."""

    def __init__(self) -> None:
        from server.registry.db import open_database

        self._sink: Any = open_database
        self._edges: dict[int, list[Any]] = {}
        self._objects: dict[int, Any] = {}
        self._reaching: set[int] | None = None
        self._pending: list[list[Any]] = []

    # -- the graph -------------------------------------------------------------------------------------

    def _key(self, obj: Any) -> int:
        self._objects[id(obj)] = obj  # kept alive so ids stay unique
        return id(obj)

    def _explore(self, roots: Iterable[Any]) -> None:
        stack = [r for r in roots if id(r) not in self._edges]
        while stack:
            obj = stack.pop()
            key = self._key(obj)
            if key in self._edges:
                continue
            succ = list(self._successors(obj))
            self._edges[key] = succ
            stack.extend(s for s in succ if id(s) not in self._edges)
        self._reaching = None

    def _successors(self, obj: Any) -> Iterator[Any]:
        obj = _unwrap(obj)
        if obj is self._sink:
            return
        if isinstance(obj, types.FunctionType):
            if _ours(obj.__module__):
                yield from self._code_refs(obj.__code__, obj.__globals__)
                for cell in obj.__closure__ or ():
                    try:
                        yield from _values(cell.cell_contents)
                    except ValueError:  # an empty cell
                        continue
        elif isinstance(obj, type):
            if _ours(obj.__module__):
                for klass in obj.__mro__:
                    if _ours(klass.__module__):
                        for member in vars(klass).values():
                            if not isinstance(member, (str, tuple, dict, list, set, frozenset)):
                                yield from _values(member)
        elif isinstance(obj, types.ModuleType):  # ``python -m`` / a module's whole namespace
            for value in vars(obj).values():
                if getattr(value, "__module__", None) == obj.__name__ or (
                        isinstance(value, types.FunctionType) and _ours(value.__module__)):
                    yield value
        elif isinstance(obj, functools_partial):
            yield obj.func
            yield from _values(obj.args)
        elif isinstance(obj, (dict, list, tuple, set, frozenset)):
            yield from _values(obj)
        elif _ours(type(obj).__module__) and not isinstance(obj, type):
            yield type(obj)

    def _code_refs(self, code: types.CodeType, globs: dict[str, Any]) -> Iterator[Any]:
        names = set(code.co_names)
        imported = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "IMPORT_NAME"}
        for name in imported:  # ``from server.app import X`` / ``from server import cli`` in a function body
            if _ours(name):
                module = next(_module_named(name), None) or sys.modules.get(name)
                if module is not None:
                    yield from _attributes(module, names)
        for name in names:
            if name not in globs:
                continue
            value = globs[name]
            if isinstance(value, types.ModuleType):
                if _ours(value.__name__):  # ``module.attr``: any attribute the code names
                    yield from _attributes(value, names - {name})
                continue
            yield value
        strings = [c for c in code.co_consts if isinstance(c, str)]
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield from self._code_refs(const, globs)
            elif isinstance(const, tuple):
                strings.extend(c for c in const if isinstance(c, str))
        if names & {"import_module", "__import__"}:  # importlib.import_module("server.commands.fleet")
            for s in strings:
                yield from _module_named(s)
        for module in _after_dash_m(code):  # [sys.executable, "-m", "server", ...]
            yield from _main_module(module)
        if "-c" in strings:  # [sys.executable, "-c", CODE]
            for s in strings:
                yield from _imports_of(s)

    # -- the answer ------------------------------------------------------------------------------------

    def _reaching_set(self) -> set[int]:
        if self._reaching is None:
            back: dict[int, list[int]] = {}
            for key, succ in self._edges.items():
                for s in succ:
                    back.setdefault(id(s), []).append(key)
            found = {id(self._sink)}
            todo = [id(self._sink)]
            while todo:
                for pred in back.get(todo.pop(), ()):
                    if pred not in found:
                        found.add(pred)
                        todo.append(pred)
            self._reaching = found
        return self._reaching

    def roots(self, item: pytest.Item) -> list[Any]:
        roots: list[Any] = [getattr(item, "obj", None)]
        info = getattr(item, "_fixtureinfo", None)
        for name in getattr(item, "fixturenames", ()):
            for fixturedef in (info.name2fixturedefs.get(name, ()) if info is not None else ()):
                roots.append(fixturedef.func)
        return [r for r in roots if r is not None]

    def touches(self, item: pytest.Item) -> bool:
        """Whether the test's function or one of its fixtures can reach ``open_database``."""
        return self.reaches(*self.roots(item))

    def reaches(self, *roots: Any) -> bool:
        """Whether any of ``roots`` (functions, classes, modules) can reach ``open_database``."""
        roots = tuple(_unwrap(r) for r in roots)
        self._explore(roots)
        reaching = self._reaching_set()
        return any(id(r) in reaching for r in roots)


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        return obj.fget
    try:
        return inspect.unwrap(obj) if callable(obj) else obj
    except ValueError:
        return obj


def _values(obj: Any) -> Iterator[Any]:
    if isinstance(obj, property):
        yield from (f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
    elif isinstance(obj, (staticmethod, classmethod)):
        yield obj.__func__
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _values(v)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _values(v)
    elif isinstance(obj, (types.FunctionType, type, functools_partial)):
        yield obj
    elif isinstance(obj, str):
        yield from _module_named(obj)
    elif _ours(type(obj).__module__):
        yield type(obj)


def _attributes(module: types.ModuleType, names: set[str]) -> Iterator[Any]:
    """The attributes of ``module`` that ``names`` names, submodules included whether imported yet or not
    (``from server import model_ops`` must not depend on what an earlier test happened to import)."""
    for n in names:
        if hasattr(module, n):
            yield getattr(module, n)
        elif hasattr(module, "__path__"):
            yield from _module_named(f"{module.__name__}.{n}")


def _after_dash_m(code: types.CodeType) -> Iterator[str]:
    """The string constants that come right after a ``"-m"`` in the code (a command line's module)."""
    previous: Any = None
    for ins in dis.get_instructions(code):
        if ins.opname == "LOAD_CONST":
            values = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
            for value in values:
                if previous == "-m" and isinstance(value, str):
                    yield value
                previous = value
        elif ins.opname not in ("NOP", "CACHE", "EXTENDED_ARG"):
            previous = None


def _module_named(name: str) -> Iterator[types.ModuleType]:
    """The project's module a dotted string names (modules imported by name)."""
    if not _ours(name) or not all(part.isidentifier() for part in name.split(".")):
        return
    try:
        yield importlib.import_module(name)
    except ImportError:
        return


def _main_module(name: str) -> Iterator[types.ModuleType]:
    if not _ours(name) or not all(part.isidentifier() for part in name.split(".")):
        return
    try:
        module = importlib.import_module(name)
        if hasattr(module, "__path__"):  # a package: ``python -m pkg`` runs pkg.__main__
            main_name = f"{name}.__main__"
            if main_name in sys.modules:
                module = sys.modules[main_name]
            else:
                source = importlib.util.find_spec(main_name)
                if source is None or source.origin is None:
                    return
                tree = ast.parse(Path(source.origin).read_text(encoding="utf-8"))
                yield from _imported(tree)
                return
    except ImportError:
        return
    yield module


def _imports_of(text: str) -> Iterator[Any]:
    if "import" not in text:
        return
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    yield from _imported(tree)


def _imported(tree: ast.AST) -> Iterator[Any]:
    """What an unimported module's source imports from the project (``server/__main__.py`` would run
    ``main()`` on import, so it is read, not imported)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _ours(node.module) and node.level == 0:
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                continue
            yield from (getattr(module, a.name) for a in node.names if hasattr(module, a.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    try:
                        yield importlib.import_module(alias.name)
                    except ImportError:
                        continue
