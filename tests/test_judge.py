"""The judge: answer extraction from responses in both prompt styles, and the (prediction, gold, verdict) table."""

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from latentseek.eval.judge import (
    answers_match,
    extract_answer,
    extract_boxed,
    extract_json_answer,
    is_equivalent,
    parse_number,
)
from latentseek.eval.prompts import JSON_ANSWER_KEY, JSON_REASONING_KEY

T, F = True, False
PMAT = "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"
EQUIVALENCE_CASES = [
    # numbers: formatting differences that must match
    ("5.00", "5", T),
    ("033", "33", T),
    ("1,000", "1000", T),
    ("1000", "1,000", T),
    ("$18", "18", T),
    ("\\$18.00", "18", T),
    ("18 dollars", "18", T),
    ("18 apples per day", "18", T),
    ("15%", "15", T),
    ("15\\%", "0.15", T),
    ("0.15", "15\\%", T),
    ("−7", "-7", T),
    ("3/4", "0.75", T),
    ("90", "90^\\circ", T),
    ("90°", "90", T),
    ("5\\text{ cm}", "5", T),
    ("10,\\!000", "10000", T),
    ("12{,}000", "12000", T),
    ("025", "25", T),
    ("25", "025", T),
    ("2.50", "2.5", T),
    ("+4", "4", T),
    ("$\\$1,234.50$", "1234.5", T),
    ("\\text{18 apples}", "18", T),
    ("-$5", "-5", T),
    ("\\textbf{(073)}", "73", T),
    # numbers that differ
    ("5.01", "5", F),
    ("33", "333", F),
    ("1,000", "100", F),
    ("0.15", "15", F),
    ("18", "-18", F),
    ("1000", "1,001", F),
    ("5", "50", F),
    ("1/3", "0.333", F),
    ("18 apples", "17", F),
    ("15%", "0.0015", F),
    ("2,5", "25", F),
    ("5 x", "5", F),
    ("", "5", F),
    (None, "5", F),
    ("1.5", "15", F),
    ("250", "25", F),
    # MATH answers that are equivalent
    ("\\frac{14}{3}", "\\frac{14}{3}", T),
    ("\\dfrac{14}{3}", "\\frac{14}{3}", T),
    ("14/3", "\\frac{14}{3}", T),
    ("\\frac12", "\\frac{1}{2}", T),
    ("0.5", "\\frac{1}{2}", T),
    ("\\frac{1}{2}", "0.5", T),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", T),
    ("(3,4]", "(3, 4]", T),
    ("\\{2, 1\\}", "\\{1,2\\}", T),
    ("-2, 1", "1,-2", T),
    ("7, 5, 3", "3, 5, 7", T),
    ("11\\sqrt{2}", "11\\sqrt2", T),
    ("-\\pi/6", "-\\frac{\\pi}{6}", T),
    ("ab+2a+5b+10", "(a+5)(b+2)", T),
    ("2(k+1)", "2k+2", T),
    ("x=5", "5", T),
    ("5", "x=5", T),
    ("Evelyn", "\\text{Evelyn}", T),
    ("\\text{East}", "\\text{east}", T),
    ("(-\\infty, 0)", "(-\\infty,0)", T),
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}", T),
    ("\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}", PMAT, T),
    ("6-5i", "6 - 5i", T),
    ("\\frac{\\cos x}{\\sin x}", "\\cot x", T),
    ("-6+3x+x^3", "x^3+3x-6", T),
    ("0.25", "\\frac{1}{4}", T),
    ("\\frac{3\\sqrt{3}}{4}", "\\frac{3\\sqrt3}{4}", T),
    ("C", "\\text{(C)}", T),
    ("3\\sqrt{13}", "\\sqrt{117}", T),
    ("$\\frac{14}{3}$", "\\frac{14}{3}", T),
    ("\\frac{243}{625}", "0.3888", T),
    # MATH answers that are not
    ("\\frac{2}{3}", "\\frac{3}{2}", F),
    ("[3,4)", "(3,4]", F),
    ("(3,4)", "(3,4]", F),
    ("3, 5", "3, 5, 7", F),
    ("\\{1,2,3\\}", "\\{1,2\\}", F),
    ("\\sqrt{50}", "\\sqrt{51}", F),
    ("11\\sqrt{3}", "11\\sqrt2", F),
    ("\\pi/6", "-\\frac{\\pi}{6}", F),
    ("2k+1", "2k+2", F),
    ("x^3+3x+6", "x^3+3x-6", F),
    ("6+5i", "6 - 5i", F),
    ("\\tan x", "\\cot x", F),
    ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)", F),
    ("\\text{West}", "\\text{east}", F),
    ("4.67", "\\frac{14}{3}", F),
    ("1 + \\sqrt{19}", "1 \\pm \\sqrt{19}", F),
    ("\\infty", "-\\infty", F),
    ("D", "\\text{(C)}", F),
    ("p+q", "p - q", F),
    ("(a+5)(b+3)", "(a+5)(b+2)", F),
    ("\\begin{pmatrix} 1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", PMAT, F),
    ("\\frac{243}{625}", "0.39", F),
]


def test_equivalence_table_is_large_and_balanced():
    verdicts = [v for _, _, v in EQUIVALENCE_CASES]
    assert len(verdicts) >= 60
    assert min(verdicts.count(True), verdicts.count(False)) >= 30


@pytest.mark.parametrize(("prediction", "gold", "verdict"), EQUIVALENCE_CASES)
def test_equivalence(prediction, gold, verdict):
    assert is_equivalent(prediction, gold) is verdict


EXTRACTION_CASES = [
    # P1: the last complete \boxed{}, nested and escaped braces, \fbox, the unbraced form
    ("So 5 + 3 = 8.\n\\boxed{8}", "8"),
    ("First \\boxed{7}, no wait: \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("The roots are $\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\fbox{42}", "42"),
    ("thus \\boxed 5.", "5."),
    ("\\boxed{12} and then the reply was cut: \\boxed{1", "12"),
    # P2: the JSON answer field, with fences, end-of-turn text, LaTeX backslashes, other key spellings
    (f'```json\n{{"{JSON_REASONING_KEY}": "3 \\times 4 = 12", "{JSON_ANSWER_KEY}": "12"}}\n```<|im_end|>', "12"),
    (
        f'{{"{JSON_REASONING_KEY}": "\\frac{{a}}{{b}}", "{JSON_ANSWER_KEY}": "\\frac{{3}}{{4}}"}}<|eot_id|>',
        "\\frac{3}{4}",
    ),
    ('{"thought process": "6 * 7", "final answer": 42}</s>', "42"),
    ('{"Final Answer": "0.5"}', "0.5"),
    ('{"answer": 18.5}', "18.5"),
    (f'Sure! {{"{JSON_REASONING_KEY}": "ignore \\\\boxed{{1}}", "{JSON_ANSWER_KEY}": "2"}}', "2"),
    (f'{{"{JSON_ANSWER_KEY}": "\\\\boxed{{9}}"}}', "9"),
    # malformed JSON (unescaped quotes, cut off): the key-value pair is still read
    (f'{{"{JSON_REASONING_KEY}": "she said "hi"", "{JSON_ANSWER_KEY}": "7"', "7"),
    (f'{{"{JSON_REASONING_KEY}": "x", "{JSON_ANSWER_KEY}": 31', "31"),
    # fall-backs: answer phrases, ####, the last number
    ("The answer is $18.", "$18"),
    ("Therefore, the final answer is: $\\frac{5}{4}$.", "\\frac{5}{4}"),
    ("Step 1 ...\n#### 1,000", "1,000"),
    ("**Answer:** 72 apples", "72"),
    ("Answer: (C)", "(C)"),
    ("She has 12 and then 15 apples", "15"),
    ("The answer is 3. Then I recheck 4 + 4 = 8", "3"),
    ("no digits at all", None),
    ("", None),
]


@pytest.mark.parametrize(("response", "expected"), EXTRACTION_CASES)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extractors_return_none_when_their_form_is_absent():
    assert extract_boxed("the answer is 5") is None
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_json_answer('{"reasoning": "no answer key"}') is None
    assert extract_json_answer("plain text 5") is None


@pytest.mark.parametrize(
    ("text", "value", "percent"),
    [
        ("1,000", Fraction(1000), False),
        ("033", Fraction(33), False),
        ("$1,234.50", Fraction(246900, 200), False),
        ("15\\%", Fraction(15), True),
        ("3/4", Fraction(3, 4), False),
        ("-.5", Fraction(-1, 2), False),
    ],
)
def test_parse_number(text, value, percent):
    assert parse_number(text) == (value, percent)


@pytest.mark.parametrize("text", ["5 x", "1,-2", "2,5", "\\frac{1}{2}", "1/0", "x=5", "1e5", ""])
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


RESPONSE_CASES = [
    ("We compute 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n\\boxed{18}", "18", True),
    ("We compute 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n\\boxed{\\$18.00}", "18", True),
    ("We compute 16 - 3 - 4 = 9 eggs.\n\\boxed{9}", "18", False),
    (f'{{"{JSON_REASONING_KEY}": "9 * 2 = 18", "{JSON_ANSWER_KEY}": "18"}}<|im_end|>', "18", True),
    (f'{{"{JSON_REASONING_KEY}": "9 * 2 = 18", "{JSON_ANSWER_KEY}": "81"}}<|im_end|>', "18", False),
    ("AIME: the remainder is \\boxed{25}", "025", True),
    ("polar form \\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("polar form \\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("I cannot solve this.", "18", False),
]


@pytest.mark.parametrize(("response", "gold", "verdict"), RESPONSE_CASES)
def test_answers_match(response, gold, verdict):
    assert answers_match(response, gold) is verdict


MATH_JOBS = [(r, g) for r, g, _ in RESPONSE_CASES] + [("\\boxed{\\frac{2}{4}}", "0.5"), ("\\boxed{[3,4)}", "(3,4]")]
MATH_VERDICTS = [v for _, _, v in RESPONSE_CASES] + [True, False]


def test_answers_match_off_the_main_thread():
    # math-verify's default timeout uses signal.alarm, which raises in any thread but the main one
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(lambda job: answers_match(*job), MATH_JOBS)) == MATH_VERDICTS


def test_answers_match_in_worker_processes():
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.starmap(answers_match, MATH_JOBS) == MATH_VERDICTS
