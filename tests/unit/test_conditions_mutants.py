"""Policy conditions' rules (agent/policy/conditions.py), found by mutation testing: what the
load-time lexer refuses and accepts (comprehensions nested or re-reading `args`, however
spaced or bracketed; brackets side by side against brackets nested; regex literals given to
`matches` in either form), what an operator reads when the library refuses a condition, the
bound on the arguments' nesting at and one over the limit, and the audit reason of each
condition that cannot be evaluated (fail closed, naming a category, never a value).

compile_condition is cached (lru_cache): each test here starts from an empty cache, so that
what it asks is worked out anew rather than answered by an earlier test's compilation."""

from __future__ import annotations

from typing import Any

import pytest

from agent.policy import conditions, rules
from agent.policy.conditions import (
    MAX_ARGUMENT_DEPTH,
    CallView,
    Condition,
    ConditionError,
    EvaluationError,
    check,
    compile_condition,
)

AGENT = "spiffe://example.org/agent/a"


@pytest.fixture(autouse=True)
def _fresh_cache():
    conditions.compile_condition.cache_clear()
    yield
    conditions.compile_condition.cache_clear()


def view(**kw: Any) -> CallView:
    base = dict(spiffe_id=AGENT, server="db", method="tools/call", tool="query", args={})
    return CallView(**(base | kw))


def refusal(source: str) -> str:
    with pytest.raises(ConditionError) as e:
        compile_condition(source)
    return str(e.value)


# ------------------------------------------------------------ comprehensions at load
@pytest.mark.parametrize(
    "source,holds",
    [
        # two comprehensions side by side: linear, allowed
        ("args.a.all(x, x > 0) && args.b.exists(y, y > 0)", True),
        # brackets inside a comprehension's body close inside it
        ("args.a.all(x, (x > 0) && [x][0] > 0) && args.b.exists(y, y > 1)", True),
        # `args` read as a field of the binder is not the variable args
        ("args.c.exists(x, x.args == 1)", False),
        # the binder spaced from its comma, a comprehension over selectors
        ("args.a.all( x , x > 0) && selectors.exists(s, s.startsWith('k8s:'))", False),
    ],
)
def test_comprehensions_one_after_the_other_are_allowed_and_bind_their_names(source, holds):
    c = compile_condition(source)
    assert c.reads == (("args", "selectors") if "selectors" in source else ("args",))
    args = {"a": [1, 2], "b": [1, 3], "c": [{"args": 2}]}
    assert c.holds(view(args=args)) is holds


@pytest.mark.parametrize(
    "source,macro",
    [
        ("args.a.all (x, x in args.b)", "all"),  # a space before the parenthesis
        ("args.a.all(x, [x][0] > 0 && x in args.b)", "all"),  # after a bracket closed
        ("args.a.all(x, (x > 0) && x in args.b)", "all"),  # after a parenthesis closed
        ("args.a.exists(x, ((x > 0)) && x in args.b)", "exists"),
        (".all(x, x in args.b)", "all"),  # the leading-dot form
    ],
)
def test_a_comprehension_that_reads_args_again_is_refused_however_written(source, macro):
    assert refusal(source).startswith(f"a comprehension ({macro}) that reads args in its body")


def test_a_syntax_error_is_reported_with_its_position_not_as_a_comprehension():
    # a source that ends in "." after a comprehension named without a receiver
    assert refusal("all(x, x in args.b) .").startswith("line 1, column ")


@pytest.mark.parametrize("source", ["args.a.all(x", "args.a.all("])
def test_a_comprehension_cut_short_is_a_syntax_error_for_the_schema(source):
    problem = check(source)
    assert problem is not None and problem.startswith("line 1, column ")


def test_a_field_named_like_a_comprehension_is_a_field():
    c = compile_condition("args.all == 1 && args.exists == 2")
    assert c.holds(view(args={"all": 1, "exists": 2}))


def test_brackets_side_by_side_are_not_nesting():
    side_by_side = " && ".join(["(true)"] * (conditions.MAX_NESTING + 2))
    assert compile_condition(side_by_side).holds(view())
    listed = " && ".join(["[1][0] == 1"] * (conditions.MAX_NESTING + 2))
    assert compile_condition(listed).holds(view())


# ------------------------------------------------------------ regex literals at load
@pytest.mark.parametrize(
    "source",
    [
        'matches(args.s, "(b")',  # the global form: the literal after a comma
        'matches(string(args.s), "(b")',  # a call among its arguments
        '[args.s][0].matches("(b")',  # a bracket before the receiver
        'size(args.s) > 0 && args.s.matches("(b")',  # a call before matches
        '(args.s.matches("(b"))',  # matches inside parentheses
    ],
)
def test_a_bad_regex_literal_is_refused_at_load_wherever_it_stands(source):
    assert refusal(source).startswith('matches("(b"): not a valid regular expression')


def test_a_pattern_read_from_the_arguments_is_checked_when_evaluated_not_at_load():
    c = compile_condition("args.s.matches(args.p)")
    assert c.holds(view(args={"s": "drop table", "p": "(?i)DROP"}))
    with pytest.raises(EvaluationError, match="evaluation failed"):
        c.holds(view(args={"s": "x", "p": "(b"}))


# ------------------------------------------------------------ what the library says
class _Refusing:
    """A program whose evaluation raises what the test gives."""

    def __init__(self, error: BaseException):
        self.error = error

    def execute(self, activation: object) -> object:
        raise self.error


class _Library:
    """The CEL library, saying what the test makes it say: `compile_error` for the
    condition's text, `regex_error` when a literal given to matches is tried."""

    def __init__(self, compile_error: Exception | None = None, regex_error: str | None = None):
        self.real = conditions._cel()
        self.compile_error, self.regex_error = compile_error, regex_error

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(conditions, "_cel", lambda: self)

    def compile(self, source: str) -> object:
        if self.regex_error is not None and source.startswith('"".matches('):
            return _Refusing(RuntimeError(self.regex_error))
        if self.compile_error is not None:
            raise self.compile_error
        return self.real.compile(source)


@pytest.mark.parametrize(
    "error,problem",
    [
        (ValueError("what went wrong\nthe expression, repeated"), "what went wrong"),
        (ValueError("y" * 400), "y" * 300),
        (ValueError(), "ValueError"),
        (
            ValueError("ERROR: <input>:3:7: " + "z" * 400 + "\n | args.x\nERROR: <input>:4:1: b"),
            "line 3, column 7: " + "z" * 300,
        ),
    ],
)
def test_the_librarys_refusal_is_shown_by_its_first_line_and_bounded(monkeypatch, error, problem):
    _Library(compile_error=error).install(monkeypatch)
    assert check("args.x == 1") == problem


@pytest.mark.parametrize(
    "said,detail",
    [
        (
            "regex parse error:\n    (a\nerror: unclosed group. Check function arguments",
            "unclosed group",
        ),
        ("regex parse error\n  error: " + "w" * 300, "w" * 200),
        ("no line naming the error", ""),
    ],
)
def test_a_regex_the_library_refuses_is_named_with_its_bounded_reason(monkeypatch, said, detail):
    _Library(regex_error=said).install(monkeypatch)
    problem = check('args.s.matches("a")')
    assert problem == f'matches("a"): not a valid regular expression ({detail})'


# ------------------------------------------------------------ evaluation, fail closed
def guarded(when: str) -> rules.Policy:
    return rules.parse(
        {
            "rule": [
                {
                    "id": "guard",
                    "spiffe_id": AGENT,
                    "server": "db",
                    "methods": ["tools/call"],
                    "effect": "deny",
                    "when": when,
                },
                {"id": "all", "spiffe_id": AGENT, "server": "db", "methods": ["*"]},
            ]
        }
    )


@pytest.mark.parametrize(
    "when,args,why",
    [
        ("args.m[args.k] == 1", {"m": {}, "k": "s3cr3t"}, "a field it reads is missing"),
        ("args.n + 1 == 2", {"n": "s3cr3t"}, "a value it reads has another type than it expects"),
        ("args.n / args.d == 1", {"n": 1, "d": 0}, "division by zero"),
        ("args.x == 1", ["s3cr3t"], "params.arguments is not a JSON object"),
    ],
)
def test_a_condition_that_cannot_be_evaluated_denies_with_the_category_in_the_audit(
    when, args, why
):
    d = guarded(when).decide(AGENT, "db", "tools/call", "q", args)
    assert (d.allowed, d.rule_id) == (False, "guard")
    assert d.reason == f"the condition of rule 'guard' cannot be evaluated: {why}"


@pytest.mark.parametrize("error", [KeyError(3), KeyError(), KeyError(None)])
def test_a_missing_key_the_library_names_otherwise_than_by_text_is_still_a_denial(error):
    c = Condition("args.m[3] == 1", _Refusing(error), ("args",))
    with pytest.raises(EvaluationError) as e:
        c.holds(view(args={"m": {}}))
    assert str(e.value) == "a field it reads is missing"


def test_any_other_library_failure_is_named_by_its_type():
    c = Condition("args.x == 1", _Refusing(OSError("s3cr3t")), ("args",))
    with pytest.raises(EvaluationError) as e:
        c.holds(view(args={"x": 1}))
    assert str(e.value) == "evaluation failed (OSError)"


# ------------------------------------------------------------ what a condition reads
def nested(levels: int) -> dict:
    """Arguments whose innermost value sits `levels` deep (the arguments object is level 1)."""
    value: Any = 1
    for _ in range(levels - 1):
        value = {"x": value}
    return value


def test_arguments_nested_to_the_limit_are_read_and_one_deeper_are_denied():
    c = compile_condition("size(args) == 1")
    assert c.holds(view(args=nested(MAX_ARGUMENT_DEPTH)))
    with pytest.raises(EvaluationError) as e:
        c.holds(view(args=nested(MAX_ARGUMENT_DEPTH + 1)))
    assert str(e.value) == f"the arguments are nested more than {MAX_ARGUMENT_DEPTH} deep"


def test_a_call_without_a_tool_reads_an_empty_tool_name():
    c = compile_condition('tool == ""')
    assert c.holds(view(method="tools/list", tool=None))
    assert not c.holds(view(tool="query"))


# ------------------------------------------------------------ compile_condition's own checks
# (mutmut makes no mutant of a decorated function: compile_condition, under lru_cache, is
# checked here at its bounds by hand)
def test_a_condition_of_exactly_the_length_limit_is_loaded_and_one_more_is_refused():
    at_limit = "true" + " " * (conditions.MAX_LENGTH - len("true"))
    assert len(at_limit) == conditions.MAX_LENGTH
    assert compile_condition(at_limit).holds(view())
    over = at_limit + " "
    assert refusal(over) == (
        f"{len(over)} characters, more than the limit of {conditions.MAX_LENGTH}"
    )


@pytest.mark.parametrize("source", ["", " ", "\n\t "])
def test_a_condition_of_nothing_but_space_is_refused_as_empty(source):
    assert refusal(source).startswith("empty;")


def test_unknown_variables_and_functions_are_each_named_and_operators_are_not_functions():
    assert refusal("zeta == 1 && alpha == 2").startswith("unknown variable alpha, zeta;")
    assert refusal("args.a.foo() && args.b.bar()").startswith("unknown function bar, foo ")
    # operators and type names are no functions or variables a condition must declare
    c = compile_condition("args.n + 1 == 2 && type(args.n) == int && !(args.n > 5)")
    assert c.reads == ("args",) and c.holds(view(args={"n": 1}))
