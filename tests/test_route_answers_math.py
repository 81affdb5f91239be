"""Answer equivalence on the forms competition-maths (MATH) answers take, both ways, with traps."""

from __future__ import annotations

import pytest

from thrifty.routing.answers import canonical, equivalent
from thrifty.routing.exact import exact_value
from thrifty.routing.latex import brace_arguments, clean

SAME = [
    # \boxed{} with nested braces, the last box of a reply
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("First \\boxed{3}, so finally \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
    ("\\boxed 5", "5"),
    # fractions: \frac, \dfrac, \tfrac, shorthand, a/b, decimals, signs
    ("\\frac12", "1/2"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\tfrac34", "\\frac{3}{4}"),
    ("$\\boxed{\\dfrac{\\sqrt3}2}$", "\\frac{\\sqrt{3}}{2}"),
    ("\\frac{-1}{2}", "-\\frac12"),
    ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{6}{4}", "\\frac{3}{2}"),
    ("\\dfrac{1}{\\sqrt{4}}", "0.5"),
    # radicals and pi compared by spelling
    ("\\sqrt2", "\\sqrt{2}"),
    ("2\\sqrt 2", "2\\sqrt{2}"),
    ("\\frac{\\pi}{2}", "\\dfrac\\pi2"),
    ("2 \\pi", "2\\pi"),
    ("x + 1", "x+1"),
    ("\\frac{a}{b} + c", "\\frac{a}{b}+c"),
    # degrees, units, words, dollars
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30 degrees"),
    ("5\\text{ cm}", "5"),
    ("5 \\mbox{ square units}", "5"),
    ("12cm", "12"),
    ("100\\text{ dollars}", "\\$100"),
    ("\\$1,\\!000", "1000"),
    ("\\text{Evelyn}", "Evelyn"),
    # sizing and spacing
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("1\\,000", "1000"),
    ("1{,}000", "1,000"),
    ("\\!5\\;", "5"),
    # x = 5
    ("x = 5", "5"),
    ("y=\\frac{1}{2}", "0.5"),
    # mixed numbers
    ("2\\frac{1}{2}", "5/2"),
    ("2 \\frac12", "2.5"),
    ("-2\\frac{1}{2}", "-2.5"),
    # lists of all solutions are unordered; sets too
    ("1, 2", "2, 1"),
    ("\\{1,2\\}", "2, 1"),
    ("x=1, x=2", "2,1"),
    ("-\\frac12, 3", "3, -0.5"),
    # intervals and tuples keep their brackets
    ("(-\\infty, 2]", "\\left(-\\infty,2\\right]"),
    ("(\\frac12, 3)", "(0.5, 3)"),
    # base subscripts, negatives, -0, scientific notation, percent
    ("1011_2", "1011_{2}"),
    ("1a_{16}", "1A_{16}"),
    ("- 5", "-5"),
    ("\u22125", "-5"),
    ("-0", "0"),
    ("1.5e3", "1500"),
    ("1.5 \\times 10^{3}", "1500"),
    ("1.5\\cdot10^3", "1500"),
    ("2^{-1}", "0.5"),
    ("10\\%", "10%"),
    ("12.5 \\%", "12.5%"),
    # LaTeX a JSON decoder mangled: \f, \b, \t, \r escapes, or doubled backslashes
    ("\x0crac12", "0.5"),  # "\frac12" in JSON: \f is a form feed
    ("\x08oxed{\x0crac{3}{4}}", "0.75"),  # \b is a backspace
    ("5\text{ cm}", "5"),  # \t is a tab
    ("\\left( 1, 2 \right)", "(1, 2)"),  # \r is a carriage return
    ("\\\\frac{1}{2}", "1/2"),  # doubled backslashes of a reply whose JSON did not parse
    # choice letters
    ("\\text{(A)}", "A"),
    ("(C)", "The answer is C"),
]

DIFFERENT = [
    ("\\frac{1}{2}", "1/3"),
    ("\\frac12", "\\frac13"),
    ("0.5", "0.50001"),
    ("\\frac13", "0.333"),
    ("(1,2)", "(2,1)"),
    ("[1,2)", "(1,2)"),
    ("[1, 2]", "[2, 1]"),
    ("10", "10%"),
    ("0.1", "10%"),
    ("1011_2", "1011"),
    ("1011_2", "11"),
    ("1011_2", "1011_3"),
    ("x_1", "X_1"),  # a subscript, not a numeral
    ("1A_{16}", "1B_{16}"),
    ("\\sqrt{2}", "1.41421"),
    ("\\sqrt{2}", "\\sqrt{3}"),
    ("\\pi", "3.14159"),
    ("2\\pi", "\\pi"),
    ("2x", "2"),
    ("3i", "3"),
    ("x^2", "x^3"),
    ("x=1,y=2", "x=2,y=1"),
    ("1, 1, 2", "1, 2"),
    ("1, 2", "1, 2, 3"),
    ("1, 234", "1234"),
    ("2 and 3", "2"),
    ("A", "B"),
    ("a", "A"),
    ("-5", "5"),
    ("2\\frac{3}{2}", "3.5"),  # not a mixed number: unsure, so not equal to either reading
    ("2\\frac{3}{2}", "3"),
    ("10^23", "1e23"),  # TeX reads 10^23 as 10^2 followed by 3
    ("\\frac{1}{0}", "0"),
    ("(1, 2)", "\\{1, 2\\}"),
    ("(-\\infty, 2]", "(-\\infty, 2)"),
    ("5 \\text{ and } 6", "5"),
    ("'h / grateful k'", "'h/grateful k'"),  # a string's spaces are part of it
    ("a + b", "ab+"),
]


@pytest.mark.parametrize(("a", "b"), SAME)
def test_maths_answer_forms_agree_both_ways(a: str, b: str) -> None:
    assert equivalent(a, b) and equivalent(b, a), (canonical(a), canonical(b))


@pytest.mark.parametrize(("a", "b"), DIFFERENT)
def test_maths_traps_disagree_both_ways(a: str, b: str) -> None:
    assert not equivalent(a, b) and not equivalent(b, a), (canonical(a), canonical(b))


def test_cleaning_only_respells() -> None:
    assert brace_arguments("\\frac12+\\sqrt[3]8") == "\\frac{1}{2}+\\sqrt[3]{8}"
    assert brace_arguments("\\frac{\\frac12}{3}") == "\\frac{\\frac{1}{2}}{3}"
    assert clean("$\\boxed{\\text{(B)}}$.") == "(B)"
    assert clean("\\boxed{\\frac") == "\\boxed{\\frac"  # a truncated reply is left as written


def test_exact_values_are_exact_or_absent() -> None:
    assert exact_value("\\frac{1}{3}+\\frac{2}{3}") == 1
    assert exact_value("0.1+0.2") == exact_value("\\frac{3}{10}")
    assert exact_value("\\sqrt{\\frac{9}{4}}") == exact_value("1.5")
    for unsure in ("\\sqrt{2}", "\\pi", "2\\sqrt{4}", "10^{1000}", "0^{-1}", "x", "1/0", "(1", "", "1" * 300):
        assert exact_value(unsure) is None, unsure
