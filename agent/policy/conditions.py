"""Conditions on policy rules: a CEL expression over the call and its caller, compiled when
the policy file is loaded and evaluated for each call a conditional rule covers.

    when = '!args.sql.matches("(?i)\\\\b(drop|delete|update)\\\\b")'

What a condition reads (VARIABLES): `tool` (the tool, prompt or resource URI the call names;
"" for other methods), `args` (params.arguments, the JSON object; {} when absent), `method`,
`server`, `spiffe_id`, `spiffe` ({trust_domain, path, segments} of the caller's SPIFFE ID) and
`selectors` (the attested selectors of the calling process, a list of strings).

The library is common-expression-language (PyO3 bindings over the Rust `cel` crate), chosen
over the pure-Python cel-python on measured cost: 0.2-0.6 us against 155-315 us per
evaluation of the same string and list conditions, 19 us against 11.6 ms over a 100-item
list (docs/policy.md has the table). Its `matches` compiles the regex on every evaluation
(0.1-0.25 ms for a case-insensitive alternation with word boundaries): prefer contains,
startsWith and endsWith where they say the same. Regexes are the Rust `regex` crate's (RE2
syntax, linear time: no catastrophic backtracking on a hostile argument).

Cost is bounded, because the evaluation holds the GIL, and so the proxy's event loop, while
it runs, and neither library offers a runtime budget (cel-go's cost limit has no
counterpart here):
- at load: at most MAX_LENGTH characters and MAX_NESTING levels of brackets (the parser's
  own limit is 96, with an error per level); no comprehension (all, exists, exists_one,
  map, filter) inside another, nor one whose body reads `args` again: either would make
  the cost grow with the square of the arguments (82 ms measured for `x in args.b` inside
  `args.a.all` at 2 x 1022 items); unknown variables and functions refused (the library
  finds them only when evaluating); regex literals compiled;
- per call: the arguments a condition reads hold at most MAX_ARGUMENT_ITEMS values, nested
  at most MAX_ARGUMENT_DEPTH deep (else the call is denied, fail closed), and their bytes
  are bounded by the body limit (policy.max_body_bytes).
So the work is at most linear in (expression size) x (arguments size): a regex or contains
over a 1 MiB argument measured 1.3-1.5 ms, a comprehension over MAX_ARGUMENT_ITEMS values
1.4-2.3 ms (tests/bench/bench_policy_conditions.py).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_LENGTH = 2048
MAX_NESTING = 32
MAX_ARGUMENT_ITEMS = 2048
MAX_ARGUMENT_DEPTH = 32
VARIABLES = ("args", "method", "selectors", "server", "spiffe", "spiffe_id", "tool")
# type names are identifiers in CEL (`type(args.n) == int`)
_TYPE_NAMES = frozenset(
    {"bool", "bytes", "double", "int", "list", "map", "null_type", "string", "type", "uint"}
)
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
# the functions of the Rust `cel` crate's standard library (0.14): it resolves a name only
# when evaluating, so an unknown one (a typo, a cel-go extension such as split) would be
# found on the first call it decides; tests/unit/test_policy_conditions.py runs each
FUNCTIONS = frozenset(
    {
        "size", "contains", "startsWith", "endsWith", "matches",
        "int", "uint", "double", "string", "bytes", "timestamp", "duration", "type", "dyn",
        "getFullYear", "getMonth", "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear",
        "getHours", "getMinutes", "getSeconds", "getMilliseconds",
    }
)  # fmt: skip
# CEL's lexical tokens, as far as the load-time checks need them: string literals (so that
# a bracket or a macro name inside one is not counted), identifiers, single characters
_TOKEN = re.compile(
    r"""(?P<string>[rR]?[bB]?[rR]?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"
        |'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"))
      |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      |(?P<space>\s+)
      |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_ERROR_LINE = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")


class ConditionError(Exception):
    """A condition that cannot be loaded: the message says why, without the expression."""


class EvaluationError(Exception):
    """A condition that could not be evaluated for a call. The message names a category,
    never a value: arguments may hold secrets, and a library error may quote them."""


def _cel() -> Any:
    """The CEL library, imported on first use: `import cel` costs 130 ms (it loads its own
    command line's dependencies), paid only by a policy that has conditions."""
    import cel

    return cel


@dataclass(frozen=True)
class _Lexed:
    max_nesting: int
    nested_macro: str | None  # a comprehension opened inside another's parentheses
    rereads: str | None  # a comprehension whose parentheses read `args` again
    binders: frozenset[str]  # the names comprehensions bind (x in `l.all(x, ...)`)
    patterns: tuple[str, ...]  # the string literals given to matches()


def _lex(source: str) -> _Lexed:
    tokens = [
        (m.lastgroup or "", m.group()) for m in _TOKEN.finditer(source) if m.lastgroup != "space"
    ]
    depth = deepest = 0
    open_macros: list[int] = []  # the depths at which open comprehensions' parentheses are
    nested: str | None = None
    rereads: str | None = None
    macro_names: list[str] = []
    binders: set[str] = set()
    patterns: list[str] = []
    for i, (kind, text) in enumerate(tokens):
        if kind == "other" and text in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif kind == "other" and text in ")]}":
            depth -= 1
            while open_macros and open_macros[-1] > depth:
                open_macros.pop()
                macro_names.pop()
        elif kind == "ident" and tokens[i + 1 : i + 2] == [("other", "(")]:
            if text in _MACROS and i > 0 and tokens[i - 1] == ("other", "."):
                if open_macros and nested is None:
                    nested = text
                open_macros.append(depth + 1)
                macro_names.append(text)
                after = tokens[i + 2 : i + 4]
                if len(after) == 2 and after[0][0] == "ident" and after[1] == ("other", ","):
                    binders.add(after[0][1])
            elif text == "matches":
                close = _closing(tokens, i + 1)
                literal = close is not None and tokens[close - 1][0] == "string"
                if close is not None and literal and tokens[close - 2][1] in ("(", ","):
                    patterns.append(tokens[close - 1][1])
        if (
            kind == "ident"
            and text == "args"
            and open_macros
            and rereads is None
            and (i == 0 or tokens[i - 1] != ("other", "."))
        ):
            rereads = macro_names[-1]
    return _Lexed(deepest, nested, rereads, frozenset(binders), tuple(patterns))


def _closing(tokens: list[tuple[str, str]], opening: int) -> int | None:
    depth = 0
    for j in range(opening, len(tokens)):
        kind, text = tokens[j]
        if kind == "other" and text in "([{":
            depth += 1
        elif kind == "other" and text in ")]}":
            depth -= 1
            if depth == 0:
                return j
    return None


def _parse_error(e: Exception) -> str:
    """The first of the parser's errors, as `line L, column C: what`: its full text repeats
    the expression and may list one error per nesting level."""
    m = _ERROR_LINE.search(str(e))
    if m is None:
        return str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    return f"line {m.group(1)}, column {m.group(2)}: {m.group(3)[:300]}"


def _regex_problem(literal: str) -> str | None:
    cel = _cel()
    try:
        cel.compile(f'"".matches({literal})').execute({})
    except Exception as e:  # noqa: BLE001 — the library's error is the problem to report
        why = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("error:")]
        detail = why[0].removeprefix("error:").split(". Check ")[0].strip() if why else ""
        return f"matches({literal}): not a valid regular expression ({detail[:200]})"
    return None


@dataclass(frozen=True, eq=False)
class Condition:
    source: str
    program: Any  # cel.Program
    reads: tuple[str, ...]  # the VARIABLES it reads: only those are handed to it

    def holds(self, call: CallView) -> bool:
        """Whether the condition holds for a call; EvaluationError when it cannot say."""
        activation = {name: call.value(name) for name in self.reads}
        try:
            result = self.program.execute(activation)
        except KeyError as e:
            # a missing map key: name it only when the expression spells it (`args.sql`),
            # not when it was computed from an argument (`args.m[args.k]`)
            key = e.args[0] if e.args and isinstance(e.args[0], str) else None
            known = key is not None and re.search(rf"\b{re.escape(key)}\b", self.source)
            raise EvaluationError(
                f"no field {key!r} in what it reads" if known else "a field it reads is missing"
            ) from None
        except TypeError:
            raise EvaluationError("a value it reads has another type than it expects") from None
        except ZeroDivisionError:
            raise EvaluationError("division by zero") from None
        except Exception as e:  # noqa: BLE001 — whatever the library raises, deny
            raise EvaluationError(f"evaluation failed ({type(e).__name__})") from None
        if not isinstance(result, bool):
            raise EvaluationError(f"it yields {type(result).__name__}, not a boolean")
        return result


@functools.lru_cache(maxsize=1024)
def compile_condition(source: str) -> Condition:
    """The condition of `source`, or ConditionError saying what is wrong with it. Cached: the
    schema's check and the rule's construction compile the same text, and a reload
    recompiles only what changed."""
    if len(source) > MAX_LENGTH:
        raise ConditionError(f"{len(source)} characters, more than the limit of {MAX_LENGTH}")
    if not source.strip():
        raise ConditionError("empty; leave `when` out for a rule without a condition")
    lexed = _lex(source)
    if lexed.max_nesting > MAX_NESTING:
        raise ConditionError(
            f"brackets nested {lexed.max_nesting} deep, more than the limit of {MAX_NESTING}"
        )
    if lexed.nested_macro is not None:
        raise ConditionError(
            f"a comprehension ({lexed.nested_macro}) inside another: its cost would grow with "
            "the product of the lists' sizes; test the inner list in a separate rule"
        )
    if lexed.rereads is not None:
        raise ConditionError(
            f"a comprehension ({lexed.rereads}) that reads args in its body: its cost would "
            "grow with the square of the arguments' size; test each list on its own"
        )
    cel = _cel()
    try:
        program = cel.compile(source)
    except Exception as e:  # noqa: BLE001 — the library raises ValueError; any is a problem
        raise ConditionError(_parse_error(e)) from None
    names = set(program.variables()) - lexed.binders - _TYPE_NAMES
    unknown = sorted(names - set(VARIABLES))
    if unknown:
        raise ConditionError(
            f"unknown variable {', '.join(unknown)}; a condition reads: {', '.join(VARIABLES)}"
        )
    functions = sorted(f for f in program.functions() if f[:1].isalpha() and f not in FUNCTIONS)
    if functions:
        raise ConditionError(
            f"unknown function {', '.join(functions)} (docs/policy.md lists those there are)"
        )
    for literal in lexed.patterns:
        problem = _regex_problem(literal)
        if problem:
            raise ConditionError(problem)
    return Condition(source, program, tuple(sorted(names & set(VARIABLES))))


def check(source: str) -> str | None:
    """The problem with a condition's text, for the policy file's schema, or None."""
    try:
        compile_condition(source)
    except ConditionError as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=4096)
def _spiffe_parts(spiffe_id: str) -> dict[str, Any]:
    rest = spiffe_id.removeprefix("spiffe://")
    trust_domain, _, path = rest.partition("/")
    return {
        "trust_domain": trust_domain,
        "path": "/" + path if path else "",
        "segments": path.split("/") if path else [],
    }


def _size_problem(value: Any) -> str | None:
    """Why the arguments are too large for a condition to read, or None: walked once,
    stopping at the first limit passed."""
    items = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        items += 1
        if items > MAX_ARGUMENT_ITEMS:
            return f"the arguments hold more than {MAX_ARGUMENT_ITEMS} values"
        if isinstance(v, dict | list):
            if depth >= MAX_ARGUMENT_DEPTH:
                return f"the arguments are nested more than {MAX_ARGUMENT_DEPTH} deep"
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return None


class CallView:
    """One call and its caller as conditions see them; made per call, the values worked out
    once and only when a condition reads them."""

    __slots__ = ("_args", "_checked", "method", "selectors", "server", "spiffe_id", "tool")

    def __init__(
        self,
        spiffe_id: str,
        server: str,
        method: str,
        tool: str | None,
        args: Any = None,
        selectors: Iterable[str] = (),
    ):
        self.spiffe_id, self.server, self.method = spiffe_id, server, method
        self.tool = tool or ""
        self._args = {} if args is None else args
        self.selectors = sorted(selectors)
        self._checked = False

    def value(self, name: str) -> Any:
        if name == "args":
            if not self._checked:
                if not isinstance(self._args, dict):
                    raise EvaluationError("params.arguments is not a JSON object")
                problem = _size_problem(self._args)
                if problem:
                    raise EvaluationError(problem)
                self._checked = True
            return self._args
        if name == "spiffe":
            return _spiffe_parts(self.spiffe_id)
        return getattr(self, name)


def argument_names(args: Any, limit: int = 32, length: int = 64) -> list[str] | None:
    """The names of a call's arguments, for the audit (never their values: arguments may
    hold secrets): in the order sent, at most `limit` (a body may hold a great many), each
    cut to `length` characters; None when the call has no arguments object."""
    if not isinstance(args, Mapping):
        return None
    return [str(k)[:length] for k in itertools.islice(args, limit)]
