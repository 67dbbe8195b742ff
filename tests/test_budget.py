import pytest

from autopeft.searching.budget import BudgetError, parse_budget


@pytest.mark.parametrize("text,limit", [("0.5%", 113_566), ("0.005", 113_566), ("120k", 120_000), ("1.2M", 1_200_000),
                                         ("73728", 73_728), ("100%", 22_713_216), (" 2.5 % ", 567_830)])
def test_budget_limits_on_minilm(text, limit):
    assert parse_budget(text).limit(22_713_216) == limit


@pytest.mark.parametrize("text", ["-1", "0", "0%", "101%", "abc", "1.5", "", "5 params", "-0.5%", "1e-9k", "1e999",
                                  "1e999k"])
def test_bad_budgets_are_one_line_errors(text):
    with pytest.raises(BudgetError) as exc:
        parse_budget(text)
    assert "\n" not in str(exc.value) and repr(text) in str(exc.value)
