"""Budgets: every form parses, bad ones say what is accepted, and each resolves to the largest fitting level.

Sizes of ``tiny_network`` (depth 8, widths (8, 16, 32), k = 4, 3 input channels), derived by hand:
conv weights at level l are ``54 l + 1192 l^2`` (stem blocks of 2*3*9, then 36+36+72+144+8+288+576+32 per unit
pair), batch-norm affine ``84 l`` (168 channels, 2 each), task0's head ``10*8 l + 10``. So task0's
``params_total`` per level is 1420, 5214, 11392, 19954.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from dvn_cli.errors import BadBudget, DvnError
from dvn_cli.planning.budgets import (
    Budget,
    describe_budget,
    format_bytes,
    format_count,
    level_costs,
    parse_budget,
    resolve_budget,
)

TASK0_TOTALS = [1420, 5214, 11392, 19954]
FORMS = "use a level (3), parameters (250k, 1.2M), a share (40%) or bytes (2MB)"


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("3", "level", 3),
        ("1", "level", 1),
        ("5000", "level", 5000),
        (" 3 ", "level", 3),
        ("250k", "params", 250_000),
        ("250K", "params", 250_000),
        ("250 k", "params", 250_000),
        ("1.2M", "params", 1_200_000),
        ("2G", "params", 2_000_000_000),
        (".5k", "params", 500),
        ("5.214k", "params", 5214),
        ("40%", "share", 40),
        ("12.5 %", "share", 12.5),
        ("100%", "share", 100),
        ("123B", "bytes", 123),
        ("500kB", "bytes", 500_000),
        ("500KB", "bytes", 500_000),
        ("2MB", "bytes", 2_000_000),
        ("2mb", "bytes", 2_000_000),
        ("1GB", "bytes", 10**9),
        ("800KiB", "bytes", 800 * 1024),
        ("1.5MiB", "bytes", 1.5 * 1024**2),
        ("1GiB", "bytes", 1024**3),
        ("2 MB", "bytes", 2_000_000),
    ],
)
def test_every_form_parses(text, kind, value):
    assert parse_budget(text) == Budget(kind, float(value), text.strip())


@pytest.mark.parametrize("text", ["3x", "0", "2.5", "-3", "", "  ", "k", "0k", "0%", "0MB", "3 levels", "1e6", "1,000"])
def test_bad_budgets_name_the_value_and_the_accepted_forms(text):
    with pytest.raises(BadBudget) as info:
        parse_budget(text)
    assert str(info.value) == f"bad budget {text.strip()!r}: {FORMS}"
    assert isinstance(info.value, DvnError)


def test_lower_case_m_is_refused_with_a_hint():
    with pytest.raises(BadBudget, match=r"^bad budget '1.2m': write millions with a capital M \(1.2M\); use a level"):
        parse_budget("1.2m")


def test_share_above_100_is_refused():
    with pytest.raises(BadBudget, match=r"^bad budget '101%': a share must be above 0% and at most 100%$"):
        parse_budget("101%")


HUGE = "1" + "0" * 400


@pytest.mark.parametrize("suffix", ["", "k", "%", "B", "kB", "GiB", "TB"])
def test_a_number_too_large_is_a_bad_budget_not_a_crash(suffix):
    """400 digits give no float (inf): every form refuses it in one line, without echoing all of it."""
    with pytest.raises(BadBudget) as info:
        parse_budget(HUGE + suffix)
    message = str(info.value)
    assert message.startswith("bad budget '1000") and "largest budget is 10^18" in message and len(message) < 160


def test_the_largest_budget_parses_and_terabytes_are_bytes():
    assert parse_budget("1000000000000000000B") == Budget("bytes", 1e18, "1000000000000000000B")
    assert parse_budget("1TB").value == 10**12 and parse_budget("2 TiB").value == 2 * 1024**4
    with pytest.raises(BadBudget, match="largest budget is 10"):
        parse_budget("1000001TB")


def test_format_count_and_bytes():
    assert [format_count(n) for n in (0, 950, 999, 1000, 44_200, 999_960, 1_200_000, 3.1e9)] == [
        "0",
        "950",
        "999",
        "1.0k",
        "44.2k",
        "1.00M",
        "1.20M",
        "3.10G",
    ]
    assert [format_bytes(n) for n in (123, 176_900, 2_800_000, 999_999, 1.2e9)] == [
        "123 B",
        "176.9 kB",
        "2.8 MB",
        "1.0 MB",
        "1.2 GB",
    ]


def test_describe_budget():
    assert describe_budget(parse_budget("10k")) == "10k parameters"
    assert describe_budget(parse_budget("2MB")) == "2MB"
    assert describe_budget(parse_budget("5%")) == "5%"
    assert describe_budget(parse_budget("3")) == "level 3"


def test_level_costs_match_the_hand_count(tiny_network):
    costs = level_costs(tiny_network, "task0")
    assert [c.params_total for c in costs] == TASK0_TOTALS
    assert [c.bytes for c in costs] == [4 * n for n in TASK0_TOTALS]
    assert [c.params_total for c in level_costs(tiny_network, 1)] == [1357, 5095, 11217, 19723]


def test_level_budget_is_the_level(tiny_network):
    assert [resolve_budget(tiny_network, "task0", str(lv)) for lv in range(1, 5)] == [1, 2, 3, 4]
    assert resolve_budget(tiny_network, 1, Budget("level", 2, "2")) == 2


@pytest.mark.parametrize("text", ["5", "5000"])
def test_level_that_does_not_exist(tiny_network, text):
    with pytest.raises(BadBudget, match=rf"^level {text} does not exist: task0 has levels 1..4$"):
        resolve_budget(tiny_network, "task0", text)


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("1.42k", 1),  # exactly level 1
        ("5.213k", 1),  # one below level 2
        ("5.214k", 2),  # exactly level 2
        ("11.391k", 2),
        ("11.392k", 3),
        ("19.953k", 3),
        ("19.954k", 4),
        ("1M", 4),
    ],
)
def test_params_budget_takes_the_largest_fitting_level(tiny_network, text, level):
    assert resolve_budget(tiny_network, "task0", text) == level


@pytest.mark.parametrize(
    ("text", "level"),
    [("5680B", 1), ("20855B", 1), ("20856B", 2), ("45568B", 3), ("79815B", 3), ("79816B", 4), ("1MB", 4)],
)
def test_bytes_budget_takes_the_largest_fitting_level(tiny_network, text, level):
    assert resolve_budget(tiny_network, "task0", text) == level


@pytest.mark.parametrize(
    ("text", "level"),
    [("7.12%", 1), ("26.13%", 1), ("26.131%", 2), ("57.09%", 2), ("57.1%", 3), ("99.99%", 3), ("100%", 4)],
)
def test_share_budget_is_of_the_tasks_top_level(tiny_network, text, level):
    # level shares of task0: 7.116%, 26.1301%, 57.0913%, 100%
    assert resolve_budget(tiny_network, "task0", text) == level


def test_share_exactly_at_a_level_fits_it(tiny_network):
    for level, total in enumerate(TASK0_TOTALS, start=1):
        share = 100 * total / TASK0_TOTALS[-1]
        assert resolve_budget(tiny_network, 0, Budget("share", share, f"{share}%")) == level
        if level > 1:
            assert resolve_budget(tiny_network, 0, Budget("share", share - 1e-6, "below")) == level - 1


def test_share_just_below_level_one_fits_nothing(tiny_network):
    share = 100 * TASK0_TOTALS[0] / TASK0_TOTALS[-1]
    with pytest.raises(BadBudget):
        resolve_budget(tiny_network, 0, Budget("share", share - 1e-6, "7.1%"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.419k", "budget 1.419k parameters fits no level of task0: the smallest, level 1, has 1.4k parameters"),
        ("5679B", "budget 5679B fits no level of task0: the smallest, level 1, has 5.7 kB"),
        ("7%", "budget 7% fits no level of task0: the smallest, level 1, has 7.1% of the full network"),
    ],
)
def test_no_level_fits_names_the_smallest(tiny_network, text, message):
    with pytest.raises(BadBudget) as info:
        resolve_budget(tiny_network, "task0", text)
    assert str(info.value) == message


def test_resolve_accepts_precomputed_costs(tiny_network):
    costs = level_costs(tiny_network, "task1")
    assert resolve_budget(tiny_network, "task1", "5.095k", costs=costs) == 2
    assert resolve_budget(tiny_network, "task1", "5.094k", costs=costs) == 1
    # the given costs decide, not a count of the network: levels said to be 1000x smaller all fit
    smaller = [replace(c, params=c.params // 1000, params_total=c.params_total // 1000) for c in costs]
    assert resolve_budget(tiny_network, "task1", "5.094k", costs=smaller) == 4


def test_resolve_on_non_contiguous_orders(scrambled_network):
    for t in range(3):
        totals = [c.params_total for c in level_costs(scrambled_network, t)]
        for level, total in enumerate(totals, start=1):
            assert resolve_budget(scrambled_network, t, Budget("params", total, str(total))) == level
            assert resolve_budget(scrambled_network, t, Budget("bytes", 4 * total, f"{4 * total}B")) == level
