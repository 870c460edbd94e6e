"""The bad-input corpus (tests/bad_inputs.py, built from the shared real data at run time): every
case must end in a clear error naming the file, a warning with a right result, or a right
result; never a foreign exception, a silent wrong result, lost data or code run. Plus a bounded
property test: the legacy-ST spot-file, Space Ranger positions, count and Matrix Market parsers
raise only the project's own errors on any mutation of a real file."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_inputs import (
    OPS,
    PARSERS,
    TOKENS,
    Case,
    cases,
    mutate,
    own_errors,
    parse_mutated,
    run_case,
)

CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path):
    result = run_case(case, tmp_path)
    assert result.outcome == case.expect, f"{result.outcome}: {result.detail}"


# -- property test ------------------------------------------------------------------------------

_ops = st.lists(st.tuples(st.sampled_from(OPS), st.floats(0, 1, exclude_max=True),
                          st.floats(0, 1, exclude_max=True), st.integers(0, 10 * len(TOKENS))),
                min_size=1, max_size=4)


@cache
def _seed(parser: str) -> bytes:
    return PARSERS[parser][0]()


@pytest.mark.parametrize("parser", list(PARSERS))
@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_parsers_raise_only_their_own_errors(parser, ops, tmp_path):
    data = mutate(_seed(parser), ops)
    try:
        parse_mutated(parser, data, tmp_path)
    except own_errors():
        pass
