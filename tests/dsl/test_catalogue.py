"""A catalogue of the mistakes new users make, each pinned to its code, position, message and hint."""

from __future__ import annotations

import pytest

from cadence.dsl.diagnostics import render
from cadence.dsl.loader import load_source

HEADER = 'event purchased = "Order Completed"\nsegment buyers = count(purchased) > 0\n'

# (rule text after HEADER, code, line, column, message fragment, hint fragment or None)
CATALOGUE = [
    # misspelt keywords
    (
        'campaign c {\n    audiance buyers\n    send template "t"\n    channel email\n}\n',
        "E101",
        4,
        5,
        "unexpected 'audiance'",
        "did you mean 'audience'?",
    ),
    (
        'campain c {\n    send template "t"\n    channel email\n}\n',
        "E104",
        3,
        1,
        "'campain' does not start a block",
        "did you mean 'campaign'?",
    ),
    (
        'campaign c {\n    send templat "t"\n    channel email\n}\n',
        "E101",
        4,
        10,
        "unexpected 'templat'",
        "did you mean 'template'?",
    ),
    (
        'campaign c {\n    send template "t"\n    channel email\n    quiet 21:00..08:00 then defr\n}\n',
        "E206",
        6,
        29,
        "'then defer' or 'then drop'",
        "did you mean 'defer'?",
    ),
    # habits from other languages
    (
        'campaign c {\n    audience: buyers\n    send template "t"\n    channel email\n}\n',
        "E101",
        4,
        13,
        "unexpected ':'",
        "not followed by ':'",
    ),
    (
        "campaign c {\n    send template welcome\n    channel email\n}\n",
        "E101",
        4,
        19,
        "unexpected 'welcome'",
        '"welcome"',
    ),
    (
        'campaign c {\n    trigger on purchased after 2 hours\n    send template "t"\n    channel email\n}\n',
        "E101",
        4,
        34,
        "unexpected 'hours'",
        "write 1h",
    ),
    (
        'campaign c {\n    send template "t"\n    channel email\n    quiet 22:00-07:00\n}\n',
        "E101",
        7,
        1,
        "expected '..'",
        "two dots",
    ),
    # misspelt channels
    (
        'campaign c {\n    send template "t"\n    channel emial\n}\n',
        "E202",
        5,
        13,
        "unknown channel 'emial'",
        "did you mean 'email'?",
    ),
    (
        'campaign c {\n    send template "t"\n    channel best of [email, smss]\n}\n',
        "E202",
        5,
        29,
        "unknown channel 'smss'",
        "did you mean 'sms'?",
    ),
    # wrong units
    (
        'campaign c {\n    send template "t"\n    channel email\n    cap 2 per 7\n}\n',
        "E302",
        6,
        15,
        "a cap's window needs a duration, got a number",
        "7d",
    ),
    ("segment s = purchased within 30\n", "E302", 3, 30, "'within' needs a duration, got a number", "7d"),
    (
        'campaign c {\n    send template "t"\n    channel email\n    quiet 21..8\n}\n',
        "E302",
        6,
        11,
        "quiet hours need a time of day",
        "21:00..08:00",
    ),
    (
        "campaign c {\n    trigger on purchased where event.total ?? 0 > €50\n"
        '    send template "t"\n    channel email\n}\n',
        "E302",
        4,
        32,
        "cannot combine a number and an amount of money",
        "currency sign",
    ),
    (
        'campaign c {\n    trigger on purchased after 2\n    send template "t"\n    channel email\n}\n',
        "E302",
        4,
        32,
        "'after' needs a duration",
        "7d",
    ),
    (
        'campaign c {\n    send template "t"\n    channel email\n    split a 50, b 50%\n}\n',
        "E302",
        6,
        13,
        "a split share is a percentage",
        "write 50%",
    ),
    # unguarded optional fields
    (
        'segment gold = customer.tier == "gold"\n',
        "E303",
        3,
        16,
        "'customer.tier' may be missing",
        "customer.tier ?? DEFAULT",
    ),
    (
        "campaign c {\n    trigger on purchased where event.value > 50\n"
        '    send template "t"\n    channel email\n}\n',
        "E303",
        4,
        32,
        "'event.value' may be missing",
        "has(event.value)",
    ),
    (
        'campaign c {\n    send template "t" with { name: customer.first_name }\n    channel email\n}\n',
        "E303",
        4,
        36,
        "'customer.first_name' may be missing",
        "??",
    ),
    (
        'campaign c {\n    audience event.value ?? 0 > 1\n    send template "t"\n    channel email\n}\n',
        "E207",
        4,
        14,
        "only known in a campaign with a trigger",
        "trigger on EVENT",
    ),
    (
        'campaign c {\n    send template "t"\n    channel email\n    cap 2 per week\n}\n',
        "E302",
        6,
        15,
        "'week' is not a duration",
        "1w or 7d",
    ),
    # splits not adding up
    (
        'campaign c {\n    send template "t"\n    channel email\n    split holdout 10%, a 45%, b 40%\n}\n',
        "E401",
        6,
        5,
        "split shares add up to 95%, not 100%",
        "100%",
    ),
    # unknown names and segments
    (
        'campaign c {\n    audience byers\n    send template "t"\n    channel email\n}\n',
        "E201",
        4,
        14,
        "unknown name 'byers'",
        "did you mean 'buyers'?",
    ),
    (
        "segment s = count(purchsed within 7d) > 0\n",
        "E201",
        3,
        19,
        "unknown name 'purchsed'",
        "did you mean 'purchased'?",
    ),
    ("segment s = cnt(purchased) > 0\n", "E203", 3, 13, "unknown function 'cnt'", "did you mean 'count'?"),
    (
        "segment s = email.opend within 7d\n",
        "E206",
        3,
        13,
        "'opend' is not something that happens on email",
        "did you mean 'opened'?",
    ),
    # ranges and zones
    (
        "attribution a {\n    conversion purchased\n    window 120d\n}\n",
        "E402",
        5,
        12,
        "between 1d and 90d, got 120d",
        None,
    ),
    (
        "attribution a {\n    conversion purchased\n    model time_decy\n}\n",
        "E206",
        5,
        11,
        "unknown attribution model 'time_decy'",
        "did you mean 'time_decay'?",
    ),
    (
        'campaign c {\n    send template "t"\n    channel email\n'
        '    quiet 21:00..08:00 in "Europe/Berln"\n}\n',
        "E403",
        6,
        27,
        "unknown time zone 'Europe/Berln'",
        "did you mean 'Europe/Berlin'?",
    ),
    (
        'campaign c {\n    send template "t"\n    channel email\n    schedule every dya at 09:00\n}\n',
        "E206",
        6,
        20,
        "'dya' is not a schedule",
        "did you mean 'day'?",
    ),
    (
        "campaign c {\n    channel email\n}\n",
        "E404",
        3,
        1,
        "campaign 'c' has no 'send' clause",
        "send template",
    ),
    ("segment s = buyers\nsegment s = buyers\n", "E204", 4, 1, "segment 's' is already defined", None),
    ("segment s = purchased\n", "E301", 3, 13, "segment needs a condition", "purchased within 30d"),
    (
        "campaign c {\n    send template 'x'\n    channel email\n}\n",
        "E103",
        4,
        19,
        "unexpected character",
        "double quotes",
    ),
]


@pytest.mark.parametrize(
    ("text", "code", "line", "column", "message", "hint"),
    CATALOGUE,
    ids=[f"{c[1]}-{i}" for i, c in enumerate(CATALOGUE)],
)
def test_mistake_is_reported_where_it_is(
    text: str, code: str, line: int, column: int, message: str, hint: str | None
) -> None:
    result = load_source(HEADER + text, file="mistake.cadence")
    assert not result.ok
    errors = result.errors
    assert len(errors) == 1, "\n".join(render(d) for d in errors)
    d = errors[0]
    assert (d.code, d.line, d.column) == (code, line, column), render(d)
    assert message in d.message
    if hint is not None:
        assert d.hint is not None and hint in d.hint, render(d)
    rendered = render(d)
    assert rendered.startswith(f"mistake.cadence:{line}:{column}: error {code}:")
    caret_line = rendered.splitlines()[2]
    assert caret_line.index("^") - caret_line.index("|") - 2 == column - 1


def test_a_file_of_mistakes_reports_each_once_in_order() -> None:
    text = "\n".join(c[0] for c in CATALOGUE if c[1] not in ("E204",)).replace("campaign c ", "campaign c_X ")
    # give every campaign its own name so duplicates do not add errors
    parts = text.split("campaign c_X ")
    text = parts[0] + "".join(f"campaign c{i} " + p for i, p in enumerate(parts[1:]))
    parts = text.split("segment s ")
    text = parts[0] + "".join(f"segment s{i} " + p for i, p in enumerate(parts[1:]))
    parts = text.split("attribution a ")
    text = parts[0] + "".join(f"attribution a{i} " + p for i, p in enumerate(parts[1:]))
    result = load_source(HEADER + text, file="many.cadence")
    expected = len([c for c in CATALOGUE if c[1] not in ("E204", "E404")]) + 1  # c-without-send is one E404
    assert len(result.errors) == expected, "\n".join(render(d) for d in result.errors)
    positions = [(d.line, d.column) for d in result.errors]
    assert positions == sorted(positions)
