"""The `make mutate` report (tests/mutate/run.py): mutmut's verdicts read, tallied per
module and scored, with the equivalent mutants set apart."""

from __future__ import annotations

import pytest

from tests.mutate import run

RESULTS = """\
    agent.inject.decide.x_decide__mutmut_1: killed
    agent.inject.decide.x_decide__mutmut_2: survived
    agent.inject.decide.x_decide__mutmut_3: timeout
    agent.inject.decide.x_under_endpoint__mutmut_1: survived
    agent.oauth.dpop.xǁDPoPKeyǁproof__mutmut_4: no tests
    agent.oauth.dpop.xǁDPoPKeyǁproof__mutmut_5: not checked
"""


def test_verdicts_are_tallied_per_module_with_equivalents_set_apart():
    results = run.parse_results("ignored line\n" + RESULTS)
    assert results["agent.oauth.dpop.xǁDPoPKeyǁproof__mutmut_4"] == "no tests"
    equivalents = run.parse_equivalents(
        "# a comment\n\nagent.inject.decide.x_under_endpoint__mutmut_1  same result: why\n"
    )
    per_module = run.tally(results, equivalents)
    decide, dpop = per_module["inject.decide"], per_module["oauth.dpop"]
    assert dict(decide.counts) == {
        "mutants": 4,
        "killed": 2,
        "timeout": 1,
        "survived": 1,
        "equivalent": 1,
    }
    assert decide.survivors == ["agent.inject.decide.x_decide__mutmut_2"]
    assert decide.score == pytest.approx(2 / 3)
    # a mutant no unit test reaches is not killed; one never checked is left out of the score
    assert dpop.survivors == ["agent.oauth.dpop.xǁDPoPKeyǁproof__mutmut_4"] and dpop.score == 0
    report = run.render(per_module)
    assert (
        "mutation score: 2/4 killed (50.0%); of the 3 a unit test reaches, 66.7%; 1 equivalent"
        in report
    )


@pytest.mark.parametrize(
    "line", ["agent.inject.decide.x_decide__mutmut_2", "not-a-mutant because", "x__mutmut_1 "]
)
def test_an_equivalent_mutant_needs_a_name_and_a_reason(line):
    with pytest.raises(ValueError, match="expected `MUTANT_NAME reason`"):
        run.parse_equivalents(line)
