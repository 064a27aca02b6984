"""`xpcnn/checks.py`: each rule accepts what it promises, returns it as a plain Python value,
and refuses the rest with a `ConfigError` naming the caller, the argument, the rule and the value."""

import math

import numpy as np
import pytest

from xpcnn.checks import dropout_ratio, env_choice, flag, non_negative_int, number_in, positive_int, seed_or_none
from xpcnn.errors import ConfigError

ACCEPTED = [
    (lambda v: positive_int(v, "n", "f"), 1, 1),
    (lambda v: positive_int(v, "n", "f"), np.int64(7), 7),
    (lambda v: non_negative_int(v, "n", "f"), 0, 0),
    (lambda v: seed_or_none(v, "f"), None, None),
    (lambda v: seed_or_none(v, "f"), np.uint32(3), 3),
    (lambda v: number_in(v, "lr", "f"), 1, 1.0),
    (lambda v: number_in(v, "m", "f", high=1.0, low_open=False, high_open=False), 1.0, 1.0),
    (lambda v: dropout_ratio(v, "f"), 0, 0.0),
    (lambda v: flag(v, "train_flg", "f"), np.bool_(False), False),
]

REFUSED = [
    (lambda v: positive_int(v, "n", "f"), 0, "f: n must be an integer >= 1, got 0"),
    (lambda v: positive_int(v, "n", "f"), True, "f: n must be an integer >= 1, got True"),
    (lambda v: positive_int(v, "n", "f"), 2.0, "f: n must be an integer >= 1, got 2.0"),
    (lambda v: non_negative_int(v, "pad", "f"), -1, "f: pad must be an integer >= 0, got -1"),
    (lambda v: seed_or_none(v, "f"), -1, "f: seed must be None or an integer >= 0, got -1"),
    (lambda v: seed_or_none(v, "f"), "1", "f: seed must be None or an integer >= 0, got '1'"),
    (lambda v: number_in(v, "lr", "f"), 0.0, "f: lr must be > 0.0, got 0.0"),
    (lambda v: number_in(v, "lr", "f"), math.inf, "f: lr must be > 0.0, got inf"),
    (lambda v: number_in(v, "lr", "f"), math.nan, "f: lr must be > 0.0, got nan"),
    (lambda v: number_in(v, "lr", "f"), "0.1", "f: lr must be a number, got '0.1'"),
    (lambda v: number_in(v, "m", "f", high=1.0, low_open=False, high_open=False), 1.5,
     "f: m must be >= 0.0 and <= 1.0, got 1.5"),
    (lambda v: number_in(v, "beta1", "f", high=1.0, low_open=False), 1.0, "f: beta1 must be >= 0.0 and < 1.0, got 1.0"),
    (lambda v: number_in(v, "beta1", "f", high=1.0, low_open=False), False, "f: beta1 must be a number, got False"),
    (lambda v: dropout_ratio(v, "f"), 1.0, "f: dropout ratio must be a number in [0, 1), got 1.0"),
    (lambda v: dropout_ratio(v, "f"), math.nan, "f: dropout ratio must be a number in [0, 1), got nan"),
    (lambda v: flag(v, "train_flg", "f"), "False", "f: train_flg must be True or False, got 'False' (str)"),
]


@pytest.mark.parametrize("check, value, expected", ACCEPTED)
def test_accepted_values_come_back_as_plain_python_values(check, value, expected):
    result = check(value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("check, value, message", REFUSED)
def test_refused_values_name_the_rule_and_the_value(check, value, message):
    with pytest.raises(ConfigError) as caught:
        check(value)
    assert str(caught.value) == message


@pytest.mark.parametrize("given, expected", [(None, "keep"), ("", "keep"), ("  ", "keep"), ("System", "system"),
                                             (" keep\n", "keep")])
def test_an_environment_choice_is_its_lower_cased_value_or_the_first_choice(monkeypatch, given, expected):
    if given is None:
        monkeypatch.delenv("XPCNN_TEST_CHOICE", raising=False)
    else:
        monkeypatch.setenv("XPCNN_TEST_CHOICE", given)
    assert env_choice("XPCNN_TEST_CHOICE", ("keep", "system")) == expected


def test_an_environment_choice_outside_the_list_names_them_and_the_value(monkeypatch):
    monkeypatch.setenv("XPCNN_TEST_CHOICE", "Off")
    with pytest.raises(ConfigError) as caught:
        env_choice("XPCNN_TEST_CHOICE", ("keep", "system"))
    assert str(caught.value) == "XPCNN_TEST_CHOICE must be one of keep, system, got 'Off'"
