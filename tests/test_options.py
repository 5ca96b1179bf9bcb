"""The option table (sos_detect/core/options.py) row by row: each flag's spelling, each default passing its own check,
each check's boundary as its rule states it, the one-line message naming the option as typed, the paper-mode
rule."""

import math
from types import SimpleNamespace

import pytest

from sos_detect.core.options import (
    MAX_IMGSZ,
    SOS_DEFAULTS,
    SOS_OPTIONS,
    OptionError,
    at_least,
    between,
    check_options,
    check_rows_below_width,
    check_sos_args,
    sos_options,
    spell,
)

ROWS = {o.key: o for o in SOS_OPTIONS}

# For every row: values its check must accept and values it must refuse (the boundaries its rule states), written
# here from the rule's words, not from the check's code.
ACCEPT_REFUSE = {
    "sos": ([True, False], [1, 0, "True", None]),
    "sos_mode": (["guarded", "paper"], ["Guarded", "exact", "", 1, None]),
    "sos_tau": ([0, 0.0, 1e-4, 0.999999], [1, 1.0, -1e-12, math.nan, math.inf, True, "1e-4", None]),
    "sos_rows": ([1, 32, None], [0, -1, 1.5, 32.0, True, "32"]),
    "sos_heads": (["box", "cls", "box,cls", "cls,box"], ["", "foo", "box,foo", 1, None]),
    "sos_loss_tol": ([0, 0.0, 0.5, 10, None], [-1e-12, math.nan, math.inf, False]),
    "sos_max_change": ([1e-12, 0.05, 1, None], [0, 0.0, -0.1, math.inf, math.nan, True]),
    "sos_capture": (["train", "eval"], ["both", "", None]),
    "sos_images": ([1, 64], [0, -1, 1.0, True, None]),
    "sos_ema": (["own", "grams", "follow"], ["none", "", None]),
    "sos_ema_images": ([1, 8], [0, 2.5, False, None]),
    "sos_order": (["end", "start"], ["middle", None]),
    "sos_heldout_images": ([0, 1, 9], [-1, 0.0, True, None]),
    "sos_every": ([1, 2], [0, -3, 1.0, None]),
    "sos_start": ([0, 5, None], [-1, 0.5, False]),
    "sos_final": ([True, False], [1, "False", None]),
    "sos_hessian_every": ([0, 3], [-1, 1.5, None]),
    "sos_hessian_images": ([1, 8], [0, None]),
    "sos_hessian_probes": ([1, 32], [0, -5, None]),
}


def test_the_table_is_complete_and_its_rows_are_consistent():
    assert set(ACCEPT_REFUSE) == set(ROWS) and len(ROWS) == len(SOS_OPTIONS)  # one row per key
    assert {o.key: o.default for o in SOS_OPTIONS} == SOS_DEFAULTS
    assert len({o.flag for o in SOS_OPTIONS}) == len(SOS_OPTIONS)
    for o in SOS_OPTIONS:
        assert o.key.startswith("sos") and o.flag == "--" + o.key.replace("_", "-"), o.key
        assert o.type in (bool, int, float, str) and o.group in ("shift", "capture", "schedule", "hessian"), o.key
        assert o.help, o.key
        assert (o.choices is None) or (o.type is str and o.default in o.choices), o.key
        assert o.default is not None or o.optional, o.key  # a None default must be allowed
        o.validate(o.default, o.flag)  # every default passes its own check


@pytest.mark.parametrize("key", sorted(ACCEPT_REFUSE))
def test_each_row_accepts_and_refuses_as_its_rule_says(key):
    o = ROWS[key]
    accept, refuse = ACCEPT_REFUSE[key]
    for value in accept:
        o.validate(value, f"{o.flag} {value}")
    for value in refuse:
        typed = spell(o.flag, value)
        with pytest.raises(OptionError) as err:
            o.validate(value, typed)
        rule = o.rule or ("True or False" if o.type is bool else f"one of {', '.join(o.choices)}")
        assert str(err.value) == f"{typed}: must be {rule}", value


def test_rules_in_words_match_their_checks():
    check, rule = at_least(3)
    assert rule == "an integer >= 3" and check(3) and not check(2) and not check(3.0) and not check(True)
    check, rule = between(32, MAX_IMGSZ)
    assert rule == f"an integer in [32, {MAX_IMGSZ}]"
    assert check(32) and check(MAX_IMGSZ) and not check(31) and not check(MAX_IMGSZ + 1) and not check(64.0)


def test_spell_writes_an_option_as_typed():
    assert spell("--sos-tau", 1) == "--sos-tau 1"
    assert spell("sos_tau=", "1e-3") == "sos_tau=1e-3"
    assert spell("--opt sos_tau=", 0.5) == "--opt sos_tau=0.5"


def test_check_options_names_the_option_as_given_with_its_text_as_typed():
    with pytest.raises(OptionError, match=r"^sos_tau=1.0: must be a number in \[0, 1\)$"):
        check_options({"sos_tau": 1.0}, SOS_OPTIONS)  # default spelling: Ultralytics' key=
    flags = {o.key: o.flag for o in SOS_OPTIONS}
    with pytest.raises(OptionError, match=r"^--sos-tau 1: must be a number in \[0, 1\)$"):
        check_options({"sos_tau": 1.0}, SOS_OPTIONS, name=flags.get, texts={"sos_tau": "1"})
    check_options({"sos_tau": 1.0}, sos_options("schedule"))  # only the given rows are checked
    check_options({"unknown": object()}, SOS_OPTIONS)  # keys without a row are not this table's


@pytest.mark.parametrize(
    "names, expected",
    [
        ({}, "sos_mode=paper: needs sos_rows= ("),
        ({"sos_mode": "--sos-mode", "sos_rows": "--sos-rows"}, "--sos-mode paper: needs --sos-rows ("),
        ({"sos_mode": "sos_mode=", "sos_rows": "--sos-rows"}, "sos_mode=paper: needs sos_rows= ("),  # its style
        ({"sos_mode": "--opt sos_mode=", "sos_rows": "--sos-rows"}, "--opt sos_mode=paper: needs --opt sos_rows= ("),
    ],
)
def test_paper_mode_needs_rows(names, expected):
    name = (lambda key: names.get(key, f"{key}=")) if names else None
    with pytest.raises(OptionError) as err:
        check_options({"sos_mode": "paper", "sos_rows": None}, SOS_OPTIONS, name=name)
    assert str(err.value).startswith(expected) and str(err.value).endswith("below the layer width)")
    with pytest.raises(OptionError):
        check_options({"sos_mode": "paper"}, SOS_OPTIONS)  # rows absent: the same as None


def test_paper_mode_rule_holds_only_where_both_rows_are_checked():
    check_options({"sos_mode": "paper", "sos_rows": 8}, SOS_OPTIONS)
    check_options({"sos_mode": "guarded", "sos_rows": None}, SOS_OPTIONS)
    check_options({"sos_mode": "paper"}, [ROWS["sos_mode"]])  # a command without --sos-rows: not its rule


def test_sos_options_keeps_table_order():
    for groups in (("shift",), ("capture", "hessian"), ("shift", "capture", "schedule", "hessian")):
        rows = sos_options(*groups)
        assert rows == tuple(o for o in SOS_OPTIONS if o.group in groups) and rows
    assert sos_options() == ()


def test_check_sos_args_reads_a_namespace():
    check_sos_args(SimpleNamespace(**SOS_DEFAULTS, lr0=0.01))
    check_sos_args(SimpleNamespace(sos_every=2))  # only the options present
    with pytest.raises(OptionError, match=r"^sos_every=0: must be an integer >= 1$"):
        check_sos_args(SimpleNamespace(**{**SOS_DEFAULTS, "sos_every": 0}))
    with pytest.raises(OptionError, match=r"^sos_mode=paper: needs sos_rows="):
        check_sos_args(SimpleNamespace(**{**SOS_DEFAULTS, "sos_mode": "paper"}))


def test_rows_below_the_narrowest_layer():
    widths = {"box.0": 64, "cls.0": 80, "box.1": 128}
    check_rows_below_width(None, widths, "--sos-rows")
    check_rows_below_width(1000, {}, "--sos-rows 1000")  # no layer known yet
    check_rows_below_width(63, widths, "--sos-rows 63")
    for rows in (64, 100):
        with pytest.raises(OptionError) as err:
            check_rows_below_width(rows, widths, f"--sos-rows {rows}")
        assert (
            str(err.value) == f"--sos-rows {rows}: must be below the layer width (box.0 of this model takes 64 inputs)"
        )
