"""The schema engine for the files an operator writes: TOML in, frozen dataclasses out.

credless.toml (agent/config.py), entries.toml (agent/identity/entries.py) and policy.toml
(agent/policy/rules.py) are declared as dataclasses whose fields carry the check of their value
in their metadata (`setting`, `required`). `build` walks the parsed TOML against such a class;
every problem becomes one line, `<key path>: <what is wrong and what is accepted>`, and all of
a file's problems are reported together as one `OperatorFileError` (ConfigError, EntriesError
and PolicyError are its kinds), so an operator fixes a file in one pass. Unknown keys are
errors: a misspelt hardening option silently ignored is worse than a refusal to start.

What the three files share is here; what one file alone needs is declared on its classes:
- `named_by` on an array of tables: the key that names an item, shown in the path of its
  problems (`rule[1] (id "a").effect`) and unique across the array;
- `removed_keys` (a class attribute): keys that once existed, with what to do instead;
- `check_together` (a static method): a rule over several keys of one table, given the raw
  table, so it is reported alongside the per-key problems;
- `extra_checks` (an argument of `build`): checks that depend on what the file is loaded
  against (the agent's trust domain, its configured servers), keyed by schema path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

# A check returns None when the value is fine, else the description of what is accepted.
Check = Callable[[Any], "str | None"]


class OperatorFileError(Exception):
    """A file the operator wrote is wrong: every problem found in it, one a line, each
    `<file>: <key path>: <what is wrong and what is accepted>`."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


# ---------------------------------------------------------------- declaring a schema
def setting(default: Any, check: Check | None = None, *, named_by: str | None = None) -> Any:
    """A key with a default; `check` sees only values of the declared type."""
    meta = {"check": check, "named_by": named_by}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def required(what: str, check: Check | None = None) -> Any:
    """A key the file must set; `what` says what it is, in the "required" problem."""
    return dataclasses.field(metadata={"what": what, "check": check, "required": True})


def computed(default: Any) -> Any:
    """A field the loader fills in, never a key of the file."""
    return dataclasses.field(default=default, metadata={"computed": True})


# ---------------------------------------------------------------- checks shared by the files
def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of: " + ", ".join(choices)

    return check


def between(low: float, high: float) -> Check:
    def check(v: Any) -> str | None:
        return None if low <= v <= high else f"between {low} and {high}"

    return check


def at_least(low: float) -> Check:
    def check(v: Any) -> str | None:
        return None if v >= low else f"at least {low}"

    return check


def positive(v: Any) -> str | None:
    return None if v > 0 else "a number greater than 0"


def absolute_path(v: Any) -> str | None:
    return None if v == "" or os.path.isabs(v) else "an absolute path"


def non_empty(v: Any) -> str | None:
    return None if v else "a non-empty string"


def used_twice(key: str, value: str) -> str:
    """The problem of an item whose naming key repeats an earlier item's."""
    return f"{value!r} is used twice; {key}s must be unique"


# ---------------------------------------------------------------- rendering values
def toml_type(v: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return "table" if isinstance(v, dict) else names.get(type(v), type(v).__name__)


def render(v: Any) -> str:
    """A value as the operator wrote it in TOML."""
    if isinstance(v, str):
        # a TOML basic string: JSON's escapes are TOML's, and a control character in a
        # value must not break the one-line-per-problem message (or forge a line of it)
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "[" + ", ".join("{...}" if isinstance(x, dict) else render(x) for x in v) + "]"
    return repr(v)


def _got(v: Any) -> str:
    return "table" if isinstance(v, dict) else f"{toml_type(v)} {render(v)}"


# ---------------------------------------------------------------- types of keys
_SCALARS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_ELEMENTS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
_ARRAYS = (list, tuple, frozenset)


def _optional_inner(ftype: Any) -> Any:
    """`int | None` -> int: TOML has no null, an absent key is the None."""
    if typing.get_origin(ftype) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(ftype) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return ftype


def _array_of(ftype: Any) -> tuple[type, Any] | None:
    """(container, element type or None) for an array type, else None."""
    origin = typing.get_origin(ftype) or ftype
    if origin not in _ARRAYS:
        return None
    args = [a for a in typing.get_args(ftype) if a is not Ellipsis]
    return origin, (args[0] if args else None)


def _table_type(ftype: Any) -> type[DataclassInstance] | None:
    return ftype if isinstance(ftype, type) and dataclasses.is_dataclass(ftype) else None


def _type_name(ftype: Any) -> str:
    array = _array_of(ftype)
    if array is None:
        return _SCALARS[ftype]
    return "an array" + (f" of {_ELEMENTS[array[1]]}" if array[1] in _ELEMENTS else "")


def _is_a(ftype: Any, v: Any) -> bool:
    if ftype is float:
        return isinstance(v, int | float) and not isinstance(v, bool)
    if ftype is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, ftype)


def _type_ok(ftype: Any, v: Any, checked: bool) -> bool:
    array = _array_of(ftype)
    if array is None:
        return _is_a(ftype, v)
    # a check on an array sees every element, so it can say what each must be
    return isinstance(v, list) and (
        checked or array[1] is None or all(_is_a(array[1], x) for x in v)
    )


# ---------------------------------------------------------------- building
_REFUSED = object()  # a value with a problem: the field keeps its default, the file fails


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Walk:
    """One pass over one file: where its problems go and the checks it was loaded against."""

    def __init__(self, problems: list[str], extra_checks: Mapping[str, Check]) -> None:
        self.problems = problems
        self.extra_checks = extra_checks

    def table(
        self, cls: type[T], data: Mapping[str, Any], path: str, schema: str, where: str
    ) -> T | None:
        """`where` names the table in the list of its accepted keys."""
        before = len(self.problems)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("computed")}
        hints = _hints(cls)
        removed: Mapping[str, str] = getattr(cls, "removed_keys", {})
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            f = fields.get(key)
            if f is None:
                self.problems.append(
                    f"{_join(path, key)}: {removed[key]}"
                    if key in removed
                    else f"{_join(path, key)}: unknown key; accepted keys in {where}: "
                    + ", ".join(sorted(fields))
                )
                continue
            built = self.value(f, hints[key], value, _join(path, key), _join(schema, key))
            if built is not _REFUSED:
                kwargs[key] = built
        for key, f in fields.items():
            if f.metadata.get("required") and key not in data:
                self.problems.append(f"{_join(path, key)}: required ({f.metadata['what']})")
        together: Callable[[Mapping[str, Any]], Iterable[tuple[str, str]]] | None = getattr(
            cls, "check_together", None
        )
        for key, problem in together(data) if together else ():
            self.problems.append(f"{_join(path, key)}: {problem}")
        return cls(**kwargs) if len(self.problems) == before else None

    def value(
        self, f: dataclasses.Field[Any], ftype: Any, value: Any, path: str, schema: str
    ) -> Any:
        ftype = _optional_inner(ftype)
        array = _array_of(ftype)
        item = _table_type(array[1]) if array is not None else None
        if item is not None:
            return self.array_of_tables(item, value, path, schema, f.metadata.get("named_by"))
        table = _table_type(ftype)
        if table is not None:
            if not isinstance(value, dict):
                self.problems.append(f"{path}: got {_got(value)}, expected a table [{path}]")
                return _REFUSED
            return self.table(table, value, path, schema, f"[{path}]")
        check: Check | None = f.metadata.get("check")
        if not _type_ok(ftype, value, check is not None):
            self.problems.append(f"{path}: got {_got(value)}, expected {_type_name(ftype)}")
            return _REFUSED
        for each in (check, self.extra_checks.get(schema)):
            accepted = each(value) if each else None
            if accepted:
                self.problems.append(f"{path}: got {render(value)}, expected {accepted}")
                return _REFUSED
        if ftype is float:
            return float(value)
        return array[0](value) if array is not None else value

    def array_of_tables(
        self, item: type[T], value: Any, path: str, schema: str, named_by: str | None
    ) -> tuple[T, ...] | object:
        if not isinstance(value, list):
            self.problems.append(
                f"{path}: got {toml_type(value)}, expected an array of tables [[{path}]]"
            )
            return _REFUSED
        not_tables = [i for i, v in enumerate(value) if not isinstance(v, dict)]
        for i in not_tables:
            self.problems.append(f"{path}[{i}]: got {_got(value[i])}, expected a table [[{path}]]")
        if not_tables:
            return _REFUSED
        items: list[T] = []
        seen: set[str] = set()
        for i, raw in enumerate(value):
            name = raw.get(named_by) if named_by else None
            where = f"{path}[{i}]"
            if named_by and isinstance(name, str) and name:
                if name in seen:
                    self.problems.append(f"{where}.{named_by}: {used_twice(named_by, name)}")
                seen.add(name)
                where += f" ({named_by} {render(name)})"
            built = self.table(item, raw, where, schema, f"[[{schema}]]")
            if built is not None:
                items.append(built)
        return tuple(items)


def build(
    cls: type[T],
    data: Mapping[str, Any],
    problems: list[str],
    extra_checks: Mapping[str, Check] | None = None,
) -> T | None:
    """`cls` built from `data`, or None with every problem appended to `problems`."""
    return _Walk(problems, extra_checks or {}).table(cls, data, "", "", "the top level")


def read_toml(
    path: str | os.PathLike[str], error: type[OperatorFileError], missing: str
) -> dict[str, Any]:
    """The TOML data of `path`; `error` when it cannot be read (`missing` says what to do
    when it does not exist)."""
    p = Path(path)
    src = str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise error(src, ["file not found; " + missing]) from None
    except IsADirectoryError:
        raise error(src, ["is a directory, expected a TOML file"]) from None
    except PermissionError:
        raise error(src, ["permission denied; run as root or make it readable"]) from None
    except OSError as e:
        raise error(src, [f"cannot read: {e.strerror}"]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(src, [f"not UTF-8 text (byte {e.start})"]) from None
    except tomllib.TOMLDecodeError as e:
        raise error(src, [f"not valid TOML: {e}"]) from None


def iter_settings(cls: type[DataclassInstance], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, default) for every setting of `cls`, tables and arrays of tables flattened:
    the shipped example files are checked against it."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("computed"):
            continue
        key = _join(prefix, f.name)
        ftype = _optional_inner(hints[f.name])
        array = _array_of(ftype)
        table = _table_type(array[1] if array is not None else ftype)
        if table is not None:
            yield from iter_settings(table, key)
        else:
            yield key, f.default
