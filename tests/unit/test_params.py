"""qserve.wire.params: every accepted form and every rejection, table-driven, plus hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from qserve.wire.params import (ParamError, is_control_name, parse_bool, parse_duration, parse_index_list,
                                parse_int, required, split_params)

U64 = 2**64 - 1
MAX_NS = 2**63 - 1


def test_param_error_is_a_value_error_with_a_one_line_reason():
    with pytest.raises(ValueError) as info:
        parse_int("_length_", "abc", 1, minimum=1)
    assert isinstance(info.value, ParamError)
    assert str(info.value) == "_length_: expected an integer >= 1, got 'abc'"
    assert info.value.name == "_length_"


@pytest.mark.parametrize("value", ["a\nb\r\x00", "x" * 5000, "\u2028"])
def test_reasons_stay_short_and_on_one_line(value):
    with pytest.raises(ParamError) as info:
        parse_int("_index_", value, 0)
    reason = str(info.value)
    assert reason.isprintable() and len(reason) < 120


# ------------------------------------------------------------------------------------------ bool

@pytest.mark.parametrize("value, expected", [
    ("true", True), ("TRUE", True), ("True", True), ("tRuE", True), ("1", True),
    ("false", False), ("FALSE", False), ("False", False), ("0", False),
])
def test_bool_accepts(value, expected):
    assert parse_bool("_raw_", value, not expected) is expected


@pytest.mark.parametrize("default", [True, False])
def test_bool_absent_is_default(default):
    assert parse_bool("_raw_", None, default) is default


@pytest.mark.parametrize("value", ["", "t", "f", "yes", "no", "on", "2", "-1", "01", " true", "true ", "truee"])
def test_bool_rejects(value):
    with pytest.raises(ParamError, match=r"^_raw_: expected true, false, 1 or 0, got "):
        parse_bool("_raw_", value, True)


# ------------------------------------------------------------------------------------------- int

@pytest.mark.parametrize("value, kwargs, expected", [
    ("1", {}, 1), ("0", {}, 0), ("007", {}, 7), ("+5", {}, 5), ("-1", {}, -1),
    ("18446744073709551615", {}, U64), ("-9223372036854775808", {}, -(2**63)),
    ("0000000000000000000000000042", {}, 42),
    ("1", {"minimum": 1}, 1), ("1000", {"minimum": 1, "maximum": 1000}, 1000),
    ("-5", {"maximum": 0}, -5),
])
def test_int_accepts(value, kwargs, expected):
    assert parse_int("_x_", value, 99, **kwargs) == expected


def test_int_absent_is_default_unchecked():
    assert parse_int("_length_", None, 1, minimum=1) == 1
    assert parse_int("_length_", None, 0, minimum=1) == 0


@pytest.mark.parametrize("value, kwargs, reason", [
    ("abc", {"minimum": 1}, "_x_: expected an integer >= 1, got 'abc'"),
    ("0", {"minimum": 1}, "_x_: expected an integer >= 1, got '0'"),
    ("-3", {"minimum": 1}, "_x_: expected an integer >= 1, got '-3'"),
    ("1001", {"minimum": 1, "maximum": 1000}, "_x_: expected an integer between 1 and 1000, got '1001'"),
    ("6", {"maximum": 5}, "_x_: expected an integer <= 5, got '6'"),
    ("", {}, "_x_: expected an integer, got ''"),
    ("1.5", {}, "_x_: expected an integer, got '1.5'"),
    ("1e3", {}, "_x_: expected an integer, got '1e3'"),
    (" 1", {}, "_x_: expected an integer, got ' 1'"),
    ("1 ", {}, "_x_: expected an integer, got '1 '"),
    ("1_000", {}, "_x_: expected an integer, got '1_000'"),
    ("0x10", {}, "_x_: expected an integer, got '0x10'"),
    ("\u0663", {}, "_x_: expected an integer, got '\u0663'"),    # Arabic-Indic digit: int() would take it
    ("--1", {}, "_x_: expected an integer, got '--1'"),
    ("+", {}, "_x_: expected an integer, got '+'"),
    ("18446744073709551616", {}, "_x_: expected an integer, got '18446744073709551616'"),
    ("-9223372036854775809", {}, "_x_: expected an integer, got '-9223372036854775809'"),
    ("9" * 5000, {}, "_x_: expected an integer, got '" + "9" * 40 + "'..."),
])
def test_int_rejects(value, kwargs, reason):
    with pytest.raises(ParamError) as info:
        parse_int("_x_", value, 1, **kwargs)
    assert str(info.value) == reason


@given(st.integers(-(2**63), U64))
def test_int_str_round_trip(n):
    assert parse_int("_index_", str(n), 0) == n


@given(st.integers(-(2**63), U64), st.integers(-(2**63), U64), st.integers(-(2**63), U64))
def test_int_bounds(n, a, b):
    lo, hi = min(a, b), max(a, b)
    if lo <= n <= hi:
        assert parse_int("_x_", str(n), 0, minimum=lo, maximum=hi) == n
    else:
        with pytest.raises(ParamError):
            parse_int("_x_", str(n), 0, minimum=lo, maximum=hi)


# -------------------------------------------------------------------------------------- duration

@pytest.mark.parametrize("value, seconds", [
    ("", 0.0), ("0", 0.0), ("0s", 0.0), ("-0s", 0.0), ("+0", 0.0), ("-0", 0.0), ("0.000000000s", 0.0),
    ("5s", 5.0), ("1.5s", 1.5), ("500ms", 0.5), ("300ms", 0.3), ("1m30s", 90.0), ("1h0m0s", 3600.0),
    ("1.5h", 5400.0), ("2us", 2e-6), ("10\u00b5s", 10e-6), ("10\u03bcs", 10e-6), ("7ns", 7e-9),
    ("1h2m3s4ms5us6ns", 3723.004005006), ("1s1s", 2.0), ("1m1h", 3660.0), ("+5s", 5.0),
    ("1.s", 1.0), (".5s", 0.5), ("005s", 5.0), ("1.0000000009s", 1.0),  # sub-ns fraction truncated
    ("5", 5.0), ("2.5", 2.5), (".25", 0.25), ("3.", 3.0), ("+2", 2.0), ("0.5", 0.5),
    ("2562047h47m16.854775807s", MAX_NS / 1e9),                         # Go's maximum Duration
])
def test_duration_accepts(value, seconds):
    assert parse_duration("_timeout_", value, 99.0) == pytest.approx(seconds, rel=1e-12, abs=0)


def test_duration_absent_is_default():
    assert parse_duration("_timeout_", None, 5.0) == 5.0


@pytest.mark.parametrize("value, expected", [
    ("-1s", "a non-negative duration"), ("-1", "a non-negative duration"), ("-0.5ms", "a non-negative duration"),
    ("-1m30s", "a non-negative duration"),
    ("2562047h47m16.854775808s", "a duration within about 292 years"),
    ("9999999999999999999999999999999999999h", "a duration within about 292 years"),
    ("106751991167301d", "a duration such as"),
    ("s", "a duration such as"), (".s", "a duration such as"), (".", "a duration such as"),
    ("1", None), ("1m30", "a duration such as"), ("5 s", "a duration such as"), (" 5s", "a duration such as"),
    ("5S", "a duration such as"), ("5sec", "a duration such as"), ("1d", "a duration such as"),
    ("1e3", "a duration such as"), ("inf", "a duration such as"), ("nan", "a duration such as"),
    ("--1s", "a duration such as"), ("1s-1s", "a duration such as"), ("1,5s", "a duration such as"),
    ("1..5s", "a duration such as"), ("\u0665s", "a duration such as"), ("PT5S", "a duration such as"),
    ("5mss", "a duration such as"), ("5\u00b5", "a duration such as"),
])
def test_duration_rejects(value, expected):
    if expected is None:  # sanity entry: "1" is fine
        assert parse_duration("_timeout_", value, 0.0) == 1.0
        return
    with pytest.raises(ParamError) as info:
        parse_duration("_timeout_", value, 0.0)
    assert str(info.value).startswith(f"_timeout_: expected {expected}")


UNITS_NS = {"ns": 1, "us": 10**3, "\u00b5s": 10**3, "\u03bcs": 10**3, "ms": 10**6, "s": 10**9,
            "m": 60 * 10**9, "h": 3600 * 10**9}
components = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(sorted(UNITS_NS))), min_size=1, max_size=6)


@given(components)
def test_duration_components_sum(parts):
    text = "".join(f"{n}{unit}" for n, unit in parts)
    total_ns = sum(n * UNITS_NS[unit] for n, unit in parts)
    if total_ns > 2**63 - 1:  # beyond Go's largest duration: refused, not summed
        with pytest.raises(ParamError):
            parse_duration("_timeout_", text, -1.0)
        return
    assert parse_duration("_timeout_", text, -1.0) == total_ns / 1e9
    if total_ns:
        with pytest.raises(ParamError):
            parse_duration("_timeout_", "-" + text, -1.0)


@given(st.integers(0, 10**9), st.integers(0, 999_999_999))
def test_duration_fraction_is_exact_to_the_nanosecond(whole, nanos):
    assert parse_duration("_timeout_", f"{whole}.{nanos:09d}s", -1.0) == (whole * 10**9 + nanos) / 1e9
    assert parse_duration("_timeout_", f"{whole}.{nanos:09d}", -1.0) == (whole * 10**9 + nanos) / 1e9


def go_duration_string(ns: int) -> str:
    """Go's time.Duration.String(), which the Go SDK sends as _timeout_."""
    if ns == 0:
        return "0s"
    if ns < 10**9:
        for unit, size in (("ms", 10**6), ("\u00b5s", 10**3), ("ns", 1)):
            if ns >= size:
                whole, frac = divmod(ns, size)
                digits = len(str(size)) - 1
                return f"{whole}" + (f".{frac:0{digits}d}".rstrip("0") if frac else "") + unit
    h, rest = divmod(ns, 3600 * 10**9)
    m, rest = divmod(rest, 60 * 10**9)
    s, frac = divmod(rest, 10**9)
    sec = f"{s}" + (f".{frac:09d}".rstrip("0") if frac else "") + "s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec


@pytest.mark.parametrize("ns, text", [(0, "0s"), (5 * 10**9, "5s"), (1500 * 10**6, "1.5s"), (5 * 10**8, "500ms"),
                                      (90 * 10**9, "1m30s"), (3600 * 10**9, "1h0m0s"), (10**4, "10\u00b5s")])
def test_go_duration_string_helper(ns, text):
    assert go_duration_string(ns) == text


@given(st.integers(0, MAX_NS))
def test_duration_go_string_round_trip(ns):
    assert parse_duration("_timeout_", go_duration_string(ns), -1.0) == ns / 1e9


@given(st.integers(0, 10**6))
def test_duration_java_and_bare_forms(n):
    assert parse_duration("_timeout_", f"{n}s", -1.0) == parse_duration("_timeout_", str(n), -1.0) == float(n)


# ------------------------------------------------------------------------------------ index list

@pytest.mark.parametrize("value, expected", [
    ("1", [1]), ("1,2,3", [1, 2, 3]), ("1,2, 3", [1, 2, 3]), (" 1 , 2 ", [1, 2]), ("1,\t2", [1, 2]),
    ("3,1,2", [3, 1, 2]), ("1,1,2,1", [1, 2]), ("1,,2,", [1, 2]), (",5", [5]), ("0", [0]), ("007", [7]),
    ("18446744073709551615", [U64]),
])
def test_index_list_accepts(value, expected):
    assert parse_index_list("_indexes_", value) == expected


@pytest.mark.parametrize("value", [
    None, "", ",", " , ", "a", "1,a", "1;2", "1 2", "-1", "+1", "1.0", "1e3", "0x1", "\u0661",
    "18446744073709551616", "1," + "9" * 100,
])
def test_index_list_rejects(value):
    with pytest.raises(ParamError, match=r"^_indexes_: expected a comma-separated list of unsigned integers, got "):
        parse_index_list("_indexes_", value)


@given(st.lists(st.integers(0, U64), min_size=1, max_size=20), st.sampled_from([",", ", ", " ,", ",,"]))
def test_index_list_round_trip(indexes, sep):
    assert parse_index_list("_indexes_", sep.join(map(str, indexes))) == list(dict.fromkeys(indexes))


# ---------------------------------------------------------------------------------- split_params

def test_required_returns_a_present_value_and_names_a_missing_one():
    assert required("_index_", "", "with _trunc_") == ""
    with pytest.raises(ParamError, match=r"^_index_: required with _trunc_$") as info:
        required("_index_", None, "with _trunc_")
    assert info.value.name == "_index_"
    with pytest.raises(ParamError, match=r"^_indexes_: required$"):
        required("_indexes_", None)


@pytest.mark.parametrize("name, control", [
    ("_length_", True), ("_x_", True), ("___", True), ("_a_b_", True), ("_Length_", True), ("_unknown_", True),
    ("_", False), ("__", False), ("_x", False), ("x_", False), ("requestId", False), ("a", False), ("", False),
    ("a_b", False),
])
def test_control_names(name, control):
    assert is_control_name(name) is control


def test_split_params():
    query = [
        ("_index_", "3"), ("_length_", "2"), ("_timeout_", "2s"), ("_raw_", "false"), ("_auto_delete_", "false"),
        ("requestId", "rid"), ("a", "b"), ("_future_", "x"), ("_private", "p"), ("_", "u"),
        ("a", "c"), ("_length_", "5"), ("empty", ""),
    ]
    control, tags = split_params(query)
    assert control == {"_index_": "3", "_length_": "5", "_timeout_": "2s", "_raw_": "false",
                       "_auto_delete_": "false", "_future_": "x"}
    assert tags == {"requestId": "rid", "a": "c", "_private": "p", "_": "u", "empty": ""}


def test_split_params_empty_and_iterators():
    assert split_params([]) == ({}, {})
    assert split_params(iter([("_eos_", "true")])) == ({"_eos_": "true"}, {})


@given(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=20))
def test_split_params_partitions_with_last_value_winning(query):
    control, tags = split_params(query)
    assert control.keys().isdisjoint(tags.keys())
    expected = dict(query)  # dict() keeps the last value of a repeated key
    assert {**control, **tags} == expected
    assert all(is_control_name(k) for k in control) and not any(is_control_name(k) for k in tags)
