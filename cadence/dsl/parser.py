"""Parse rule text into the syntax tree, one top-level block at a time.

The grammar lives in ``cadence.lark``; it is loaded once per process and cached
(:func:`grammar`). A file is first cut into top-level blocks at every line that
starts, in column 1, with a top-level keyword (or something close to one), and
each block is parsed on its own: a syntax error ends only its block, so a file
with two mistakes reports two errors, not sixteen.

>>> module = parse_text('segment vip = customer.tier ?? "" == "gold"', "x.cadence")
>>> module.blocks[0].name, module.diagnostics
('vip', [])
"""

from __future__ import annotations

import difflib
import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, time
from functools import cache
from operator import itemgetter
from pathlib import Path as FilePath
from typing import Any, TypedDict, cast

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from cadence.dsl import ast
from cadence.dsl.diagnostics import UNIT_WORDS, Diagnostic, did_you_mean

__all__ = ["KEYWORDS", "TOP_LEVEL", "ParsedModule", "gc_paused", "grammar", "parse_text"]

GRAMMAR_FILE = FilePath(__file__).with_name("cadence.lark")

try:  # the Cython build of lark's LALR parser and lexer: same results, about 1.6x faster
    import lark_cython  # type: ignore[import-untyped]

    _PLUGINS: dict[str, Any] | None = lark_cython.plugins
    # its tokens are not lark.Token subclasses, but have the same type/line/column/str()
    TOKEN_TYPES: tuple[type[Token], ...] = (Token, cast(type[Token], lark_cython.Token))
except ImportError:  # pragma: no cover - pure-Python lark is the fallback
    _PLUGINS = None
    TOKEN_TYPES = (Token,)
MAX_DEPTH = 200
TOP_LEVEL = ("import", "event", "segment", "campaign", "attribution", "settings", "test")
DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}

_KEYWORD_LINE = re.compile(r'^(_?[A-Z]+): "([a-z]+)"$', re.MULTILINE)
_READABLE = {
    "NAME": "a name",
    "STRING": "a quoted string",
    "NUMBER": "a number",
    "DURATION": "a duration such as 7d",
    "PERCENT": "a percentage such as 10%",
    "MONEY": "an amount such as €50",
    "TIMEOFDAY": "a time of day such as 09:00",
    "TIMESTAMP": "a date such as 2026-03-04",
    "ZONE": "a time zone",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "COLON": "':'",
    "DOT": "'.'",
    "_EQ": "'='",
    "EQEQ": "'=='",
    "NEQ": "'!='",
    "CMP": "a comparison",
    "QQ": "'??'",
    "DOTDOT": "'..'",
    "MINUS": "'-'",
    "PLUS": "'+'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "_SEMI": "';'",
    "QUANT": "'every' or 'any'",
}


@dataclass
class ParsedModule:
    """One parsed file: its blocks in order, its comments, and its syntax diagnostics.

    ``broken`` maps a name defined by a block that failed to parse to its kind, so the
    checker does not report a second error for every use of it.
    """

    file: str
    text: str
    blocks: list[ast.Block] = field(default_factory=list)
    comments: list[tuple[int, int, str]] = field(default_factory=list)  # line, column, text
    diagnostics: list[Diagnostic] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)

    @property
    def lines(self) -> list[str]:
        """The source lines."""
        return self.text.splitlines()


@cache
def _grammar_text() -> tuple[str, dict[str, str]]:
    """The grammar with keywords turned into whole-word regexes, and the keyword map."""
    raw = GRAMMAR_FILE.read_text()
    keywords = {name: word for name, word in _KEYWORD_LINE.findall(raw)}
    text = _KEYWORD_LINE.sub(lambda m: f"{m.group(1)}.3: /{m.group(2)}(?![A-Za-z0-9_])/", raw)
    return text, keywords


#: Terminal name -> keyword, e.g. ``AUDIENCE -> audience``.
KEYWORDS: dict[str, str] = _grammar_text()[1] | {"QUANT": "every"}


@cache
def grammar() -> Lark:
    """The LALR parser (contextual lexer) with the AST builder embedded; built once."""
    parser = Lark(
        _grammar_text()[0],
        parser="lalr",
        lexer="contextual",
        maybe_placeholders=False,
        cache=True,
        **({"_plugins": _PLUGINS} if _PLUGINS else {}),
    )
    _install_reductions(parser, _Builder())
    return parser


class _Reduction:
    """A grammar rule as the LALR loop reads it (``origin.name``, ``len(expansion)``).

    lark keys its reduction callbacks by its ``Rule`` objects, whose hash and equality
    are Python methods called on every reduction; this stand-in hashes by identity.
    """

    __slots__ = ("expansion", "origin")

    def __init__(self, origin: Any, expansion: tuple[Any, ...]) -> None:
        self.origin = origin
        self.expansion = expansion


def _reduction_callback(rule: Any, builder: _Builder) -> Any:
    """The function that turns one reduction's children into its AST value.

    It does what lark's tree builder and an inline transformer would, in one call:
    drops filtered tokens (``"{"``, ``_KEYWORD``), splices the lists built for the
    grammar's ``(...)*`` helper rules, returns a ``?rule``'s only child as it is, and
    calls the builder method named after the rule or its alias.
    """
    keep = [
        (i, not sym.is_term and sym.name.startswith("_"))
        for i, sym in enumerate(rule.expansion)
        if rule.options.keep_all_tokens or not (sym.is_term and sym.filter_out)
    ]
    name = str(rule.alias or rule.options.template_source or rule.origin.name)
    method = getattr(builder, name, None)
    expand1 = bool(rule.options.expand1) and not rule.alias
    splices = any(expand for _, expand in keep)
    indices = [i for i, _ in keep]
    if expand1 and len(keep) == 1 and not splices:
        return itemgetter(indices[0])  # a ?rule with one child: that child, without a Python call
    if method is None:
        if not name.startswith("_"):  # pragma: no cover - a grammar change without its builder method
            raise AssertionError(f"no AST builder for grammar rule {name!r}")
        method = list  # an EBNF helper: its children are spliced into the parent
    fn = method
    if splices:
        if fn is list and [e for _, e in keep] == [True, False]:
            first, second = indices

            def grow(s: list[Any]) -> list[Any]:  # left recursion: keep growing the same list
                out: list[Any] = s[first]
                out.append(s[second])
                return out

            return grow

        def gather(s: list[Any]) -> list[Any]:
            out: list[Any] = []
            for i, expand in keep:
                if expand:
                    if out:
                        out.extend(s[i])
                    else:
                        out = s[i]
                else:
                    out.append(s[i])
            return out

        if fn is list:
            return gather
        if expand1:
            return lambda s: c[0] if len(c := gather(s)) == 1 else fn(*c)
        return lambda s: fn(*gather(s))
    if fn is list:
        return list if len(indices) == len(rule.expansion) else lambda s: [s[i] for i in indices]
    if len(indices) == len(rule.expansion):
        return lambda s: fn(*s)
    if len(indices) == 1:
        index = indices[0]
        return lambda s: fn(s[index])
    return lambda s: fn(*[s[i] for i in indices])


def _install_reductions(parser: Lark, builder: _Builder) -> None:
    """Make the LALR loop build AST nodes directly (no parse tree, no per-reduction rule hashing)."""
    from lark.parsers.lalr_analysis import Reduce

    callbacks = parser._callbacks
    table = parser.parser.parser._parse_table
    fast: dict[int, _Reduction] = {}
    new_callbacks: dict[Any, Any] = {}
    for actions in table.states.values():
        for terminal, (action, rule) in list(actions.items()):
            if action is not Reduce:
                continue
            reduction = fast.get(id(rule))
            if reduction is None:
                reduction = fast[id(rule)] = _Reduction(rule.origin, rule.expansion)
                new_callbacks[reduction] = _reduction_callback(rule, builder)
            actions[terminal] = (action, reduction)
    # the parser holds this very dict: refill it in place
    callbacks.clear()
    callbacks.update(new_callbacks)


def _decode_string(raw: str) -> str:
    r"""The value of a quoted string token (escapes: \" \\ \n \t).

    >>> _decode_string('"a\\"b"')
    'a"b'
    """
    body = raw[1:-1]
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def duration_ms(text: str) -> int:
    """Milliseconds in a duration literal.

    >>> duration_ms("2h"), duration_ms("1.5d"), duration_ms("250ms")
    (7200000, 129600000, 250)
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", text)
    assert m is not None
    return int(round(float(m.group(1)) * DURATION_MS[m.group(2)]))


def _time_of_day(text: str) -> time | None:
    hours, minutes = text.split(":")
    h, m = int(hours), int(minutes)
    if h == 24 and m == 0:
        return time(0, 0)
    if h > 23 or m > 59:
        return None
    return time(h, m)


def _timestamp(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace(" ", "T"))
    except ValueError:
        return None


class _Pos(TypedDict):
    line: int
    column: int


def _pos(item: Any) -> _Pos:
    if isinstance(item, TOKEN_TYPES):
        return {"line": item.line or 0, "column": item.column or 0}
    return {"line": getattr(item, "line", 0), "column": getattr(item, "column", 0)}


def _strs(items: list[Any], kind: str) -> list[Token]:
    return [t for t in items if isinstance(t, TOKEN_TYPES) and t.type == kind]


#: A lexed token (lark's ``Token`` or lark_cython's): ``value``, ``type``, and int ``line``/``column``.
_Tok = Any


class _Builder:
    """Turns each reduction straight into an AST node (called from the LALR loop)."""

    # ---- literals and atoms
    def number(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("number", float(str(tok)), str(tok), line=tok.line, column=tok.column)

    def duration(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("duration", duration_ms(str(tok)), str(tok), line=tok.line, column=tok.column)

    def percent(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("percent", float(str(tok)[:-1]) / 100.0, str(tok), line=tok.line, column=tok.column)

    def money(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("money", float(str(tok)[1:]), str(tok), line=tok.line, column=tok.column)

    def timeofday(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("timeofday", _time_of_day(str(tok)), str(tok), line=tok.line, column=tok.column)

    def timestamp(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("timestamp", _timestamp(str(tok)), str(tok), line=tok.line, column=tok.column)

    def string(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("string", _decode_string(str(tok)), str(tok), line=tok.line, column=tok.column)

    def true(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("bool", True, "true", line=tok.line, column=tok.column)

    def false(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("bool", False, "false", line=tok.line, column=tok.column)

    def now(self, tok: _Tok) -> ast.Lit:
        return ast.Lit("now", None, "now", line=tok.line, column=tok.column)

    def path(self, *names: _Tok) -> ast.Path:
        first = names[0]
        return ast.Path(tuple([n.value for n in names]), line=first.line, column=first.column)

    def call(self, name: _Tok, *args: Any) -> ast.Call:
        return ast.Call(str(name), tuple(args), line=name.line, column=name.column)

    def set_lit(self, bracket: _Tok, *items: Any) -> ast.SetLit:
        return ast.SetLit(tuple(items), line=bracket.line, column=bracket.column)

    # ---- operators: a flat operand/operator list, given its precedence here
    def eqop(self) -> _Tok:
        return Token("EQEQ", "==")

    def item(self, *children: Any) -> _Prefixed:
        return _Prefixed(list(children[:-1]), children[-1])

    def binexpr(self, *children: Any) -> ast.Expr:
        if len(children) == 1 and not isinstance(children[0], _Prefixed):
            return children[0]  # type: ignore[no-any-return]
        seq: list[Any] = []
        for child in children:
            if isinstance(child, _Prefixed):
                seq.extend(child.prefixes)
                seq.append(child.operand)
            else:
                seq.append(child)
        return _climb(seq)

    def within(self, subject: Any, _kw: _Tok, window: Any) -> ast.Binary:
        return ast.Binary("within", subject, window, line=subject.line, column=subject.column)

    def between(self, subject: Any, _kw: _Tok, older: Any, _and: _Tok, newer: Any) -> ast.Between:
        # "between 90d and 30d ago": the trailing "ago" parses as a postfix of the second bound
        ago = isinstance(newer, ast.Unary) and newer.op == "ago"
        if ago:
            newer = newer.operand
        if isinstance(older, ast.Unary) and older.op == "ago":
            older = older.operand
        return ast.Between(subject, older, newer, ago, line=subject.line, column=subject.column)

    def ago(self, operand: Any, _kw: _Tok) -> ast.Unary:
        return ast.Unary("ago", operand, line=operand.line, column=operand.column)

    # ---- campaign clauses
    def _clause(self, kw: _Tok, **args: Any) -> ast.Clause:
        return ast.Clause(str(kw), args, line=kw.line, column=kw.column)

    def audience(self, kw: _Tok, expr: Any) -> ast.Clause:
        return self._clause(kw, expr=expr)

    def unless(self, kw: _Tok, expr: Any) -> ast.Clause:
        return self._clause(kw, expr=expr)

    def priority(self, kw: _Tok, expr: Any) -> ast.Clause:
        return self._clause(kw, expr=expr)

    def starts(self, kw: _Tok, expr: Any) -> ast.Clause:
        return self._clause(kw, expr=expr)

    def ends(self, kw: _Tok, expr: Any) -> ast.Clause:
        return self._clause(kw, expr=expr)

    def window(self, kw: _Tok, expr: Any) -> ast.Clause:
        return self._clause(kw, expr=expr)

    def spacing(self, kw: _Tok, expr: Any) -> ast.Clause:
        return self._clause(kw, expr=expr)

    def exclusive(self, kw: _Tok, group: _Tok) -> ast.Clause:
        return self._clause(kw, group=_decode_string(str(group)))

    def timezone(self, kw: _Tok, zone: _Tok) -> ast.Clause:
        return self._clause(kw, zone=_decode_string(str(zone)), zone_pos=_pos(zone))

    def event_name(self, *parts: _Tok) -> ast.Path | ast.Lit:
        if parts[0].type == "STRING":
            return ast.Lit(
                "string",
                _decode_string(str(parts[0])),
                str(parts[0]),
                line=parts[0].line,
                column=parts[0].column,
            )
        return ast.Path(tuple(str(p) for p in parts), line=parts[0].line, column=parts[0].column)

    def trigger(self, kw: _Tok, event: Any, *rest: Any) -> ast.Clause:
        where = after = None
        items = list(rest)
        while items:
            marker = items.pop(0)
            value = items.pop(0)
            if marker.type == "WHERE":
                where = value
            else:
                after = value
        return self._clause(kw, event=event, where=where, after=after)

    def send(self, kw: _Tok, template: _Tok, *variables: Any) -> ast.Clause:
        return self._clause(
            kw, template=_decode_string(str(template)), template_pos=_pos(template), vars=list(variables)
        )

    def sync(self, kw: _Tok, _audience: _Tok, channel: _Tok, *variables: Any) -> ast.Clause:
        return self._clause(kw, channel=(str(channel), _pos(channel)), vars=list(variables))

    def var(self, name: _Tok, expr: Any) -> tuple[str, Any, _Pos]:
        return (str(name), expr, _pos(name))

    def channel_best(self, kw: _Tok, _best: _Tok, *names: _Tok) -> ast.Clause:
        return self._clause(kw, mode="best", channels=[(str(n), _pos(n)) for n in names])

    def channel_ordered(self, kw: _Tok, *names: _Tok) -> ast.Clause:
        return self._clause(kw, mode="ordered", channels=[(str(n), _pos(n)) for n in names])

    def cap(self, kw: _Tok, count: Any, window: Any, *rest: _Tok) -> ast.Clause:
        channel = calendar = None
        for tok in rest:
            if tok.type == "CALENDAR":
                calendar = _pos(tok)
            else:
                channel = (str(tok), _pos(tok))
        return self._clause(kw, count=count, window=window, on=channel, calendar=calendar)

    def quiet(self, kw: _Tok, start: Any, _dots: _Tok, end: Any, *rest: Any) -> ast.Clause:
        zone = action = None
        items = list(rest)
        while items:
            item = items.pop(0)
            if isinstance(item, TOKEN_TYPES) and item.type == "IN":
                zone = items.pop(0)
            else:
                action = (str(item), _pos(item))
        return self._clause(kw, start=start, end=end, zone=zone, action=action)

    def schedule(self, kw: _Tok, _every: _Tok, unit: _Tok, *rest: Any) -> ast.Clause:
        at = zone = None
        items = list(rest)
        while items:
            item = items.pop(0)
            if isinstance(item, TOKEN_TYPES) and item.type == "IN":
                zone = items.pop(0)
            else:
                at = item
        return self._clause(kw, every=(str(unit), _pos(unit)), at=at, zone=zone)

    def split(self, kw: _Tok, *items: Any) -> ast.Clause:
        learned = bool(items) and isinstance(items[0], TOKEN_TYPES)  # `split learned a 50%, ...`
        return self._clause(kw, arms=list(items[1:] if learned else items), learned=learned)

    def arm(self, name: _Tok, share: Any, template: _Tok | None = None) -> ast.Arm:
        return ast.Arm(
            str(name),
            share,
            _decode_string(str(template)) if template is not None else None,
            line=name.line,
            column=name.column,
        )

    # ---- attribution clauses
    def conversion(self, kw: _Tok, event: Any, *value: _Tok) -> ast.Clause:
        prop = None
        if value:
            prop = (str(value[0]), str(value[1]), _pos(value[0]))
        return self._clause(kw, event=event, value=prop)

    def model(self, kw: _Tok, name: _Tok, *params: Any) -> ast.Clause:
        return self._clause(kw, name=str(name), name_pos=_pos(name), params=list(params))

    def model_arg(self, name: _Tok, expr: Any) -> tuple[str, Any, _Pos]:
        return (str(name), expr, _pos(name))

    def channel_rule(self, kw: _Tok, name: _Tok, *matches: Any) -> ast.Clause:
        return ast.Clause(
            "channel_rule",
            {"channel": str(name), "channel_pos": _pos(name), "when": list(matches)},
            line=kw.line,
            column=kw.column,
        )

    def field_match(self, name: _Tok, *rest: _Tok) -> tuple[str, str, str, _Pos]:
        op = "matches" if rest[0].type == "MATCHES" else "="
        return (str(name), op, _decode_string(str(rest[-1])), _pos(name))

    def credit(self, kw: _Tok, channel: _Tok, *rest: Any) -> ast.Clause:
        value = rest[0] if kw.type != "EXCLUDE" and rest else None
        when = rest[-1] if rest and (kw.type == "EXCLUDE" or len(rest) == 2) else None
        return self._clause(kw, channel=str(channel), channel_pos=_pos(channel), value=value, when=when)

    def tp_or(self, left: Any, _op: _Tok, right: Any) -> tuple[Any, ...]:
        return ("or", left, right)

    def tp_and(self, left: Any, _op: _Tok, right: Any) -> tuple[Any, ...]:
        return ("and", left, right)

    def tp_neg(self, _tok: _Tok, operand: Any) -> tuple[Any, ...]:
        return ("not", operand)

    def tp_quant(self, quant: _Tok, field_: _Tok, *rest: _Tok) -> tuple[Any, ...]:
        op = str(rest[0]) if len(rest) == 2 else "=="
        return ("quant", str(quant), str(field_), op, _decode_string(str(rest[-1])), _pos(field_))

    # ---- tests
    def given_customer(self, kw: _Tok, _customer: _Tok, *fields: Any) -> ast.Clause:
        return self._clause(kw, customer=list(fields))

    def given_events(self, kw: _Tok, _events: _Tok, *fixtures: ast.Fixture) -> ast.Clause:
        return ast.Clause("given_events", {"events": list(fixtures)}, line=kw.line, column=kw.column)

    def fixture(self, event: Any, moment: ast.Moment, props: Any = None) -> ast.Fixture:
        return ast.Fixture(
            event, moment, tuple((n, e) for n, e, _p in (props or [])), line=event.line, column=event.column
        )

    def props(self, *fields: Any) -> list[Any]:
        return list(fields)

    def moment_abs(self, ts: _Tok, zone: _Tok | None = None) -> ast.Moment:
        text = str(ts) + (f" {zone}" if zone is not None else "")
        return ast.Moment(
            absolute=str(ts),
            zone=str(zone) if zone is not None else None,
            text=text,
            line=ts.line,
            column=ts.column,
        )

    def moment_rel(self, sign: _Tok, dur: _Tok) -> ast.Moment:
        ms = duration_ms(str(dur))
        return ast.Moment(
            offset_ms=-ms if str(sign) == "-" else ms, text=f"{sign}{dur}", line=sign.line, column=sign.column
        )

    def step(self, moment: ast.Moment, *rest: Any) -> ast.Step:
        items = list(rest)
        trigger = None
        if not (isinstance(items[0], TOKEN_TYPES) and items[0].type == "EXPECT"):
            event = items.pop(0)
            props = items.pop(0) if not isinstance(items[0], TOKEN_TYPES) else []
            trigger = ast.Fixture(
                event, moment, tuple((n, e) for n, e, _p in props), line=event.line, column=event.column
            )
        items.pop(0)  # EXPECT
        step: ast.Step = items[0]
        step.at = moment
        step.trigger = trigger
        step.line, step.column = moment.line, moment.column
        return step

    def expect_send(self, _send: _Tok, name: _Tok, *rest: _Tok) -> ast.Step:
        channel = next((t for t in rest if t.type == "NAME"), None)
        when = next((t for t in rest if t.type == "SEND_TIME"), None)
        step = ast.Step(
            ast.Moment(),
            "send",
            str(name),
            str(channel) if channel is not None else None,
            target_pos=_tp(name),
        )
        if when is not None:
            text = str(when)
            step.send_time = text[2:].strip()  # after "at"
            step.send_time_pos = (when.line or 0, (when.column or 0) + len(text) - len(step.send_time))
        return step

    def expect_no_send(self, _no: _Tok, _send: _Tok, *because: _Tok) -> ast.Step:
        if because:
            return ast.Step(
                ast.Moment(),
                "no_send",
                None,
                None,
                str(because[0]),
                str(because[1]),
                target_pos=_tp(because[0]),
            )
        return ast.Step(ast.Moment(), "no_send", None, target_pos=_tp(_send))

    def expect_eligible(self, *toks: _Tok) -> ast.Step:
        kind = "not_eligible" if toks[0].type == "NOT" else "eligible"
        return ast.Step(ast.Moment(), kind, str(toks[-1]), target_pos=_tp(toks[-1]))

    def expect_member(self, *toks: _Tok) -> ast.Step:
        kind = "not_member" if toks[0].type == "NOT" else "member"
        return ast.Step(ast.Moment(), kind, str(toks[-1]), target_pos=_tp(toks[-1]))

    # ---- blocks
    def import_decl(self, kw: _Tok, path: _Tok, alias: _Tok | None = None) -> ast.Import:
        return ast.Import(
            _decode_string(str(path)),
            str(alias) if alias is not None else None,
            line=kw.line,
            column=kw.column,
        )

    def event_decl(self, kw: _Tok, name: _Tok, value: _Tok) -> ast.EventAlias:
        return ast.EventAlias(str(name), _decode_string(str(value)), line=kw.line, column=kw.column)

    def segment_decl(self, kw: _Tok, name: _Tok, *rest: Any) -> ast.Segment:
        title = _decode_string(str(rest[0])) if len(rest) == 2 else None
        return ast.Segment(str(name), title, rest[-1], line=kw.line, column=kw.column)

    def campaign_decl(self, kw: _Tok, name: _Tok, *rest: Any) -> ast.Campaign:
        title, clauses = _title_and_clauses(rest)
        return ast.Campaign(str(name), title, clauses, line=kw.line, column=kw.column)

    def attribution_decl(self, kw: _Tok, name: _Tok, *rest: Any) -> ast.Attribution:
        title, clauses = _title_and_clauses(rest)
        return ast.Attribution(str(name), title, clauses, line=kw.line, column=kw.column)

    def settings_decl(self, kw: _Tok, *clauses: ast.Clause) -> ast.Settings:
        return ast.Settings(list(clauses), line=kw.line, column=kw.column)

    def test_decl(self, kw: _Tok, name: _Tok, *items: Any) -> ast.Test:
        test = ast.Test(_decode_string(str(name)), line=kw.line, column=kw.column)
        customer: list[tuple[str, Any]] = []
        events: list[ast.Fixture] = []
        steps: list[ast.Step] = []
        for item in items:
            if isinstance(item, ast.Step):
                steps.append(item)
            elif item.keyword == "given_events":
                events.extend(item.args["events"])
            else:
                customer.extend((n, e) for n, e, _p in item.args["customer"])
                test.customer_pos = (item.line, item.column)
        test.customer, test.events, test.steps = tuple(customer), tuple(events), tuple(steps)
        return test

    def start(self, block: Any) -> Any:
        return block


@dataclass
class _Prefixed:
    """An operand with prefix operators (``not``, ``-``) before it, before precedence is applied."""

    prefixes: list[Token]
    operand: Any


#: Binary operator precedence (higher binds tighter); ``??`` is right-associative.
BINARY_PREC = {
    "or": 1,
    "and": 2,
    "==": 4,
    "!=": 4,
    ">": 4,
    "<": 4,
    ">=": 4,
    "<=": 4,
    "in": 4,
    "not in": 4,
    "matches": 4,
    "??": 5,
    "+": 6,
    "-": 6,
    "*": 7,
    "/": 7,
}
NOT_PREC = 3


def _op_name(tok: Token) -> str:
    text = str(tok)
    if tok.type == "NOTIN":
        return "not in"
    return text


def _climb(seq: list[Any]) -> ast.Expr:
    """Precedence climbing over ``[operand, op, operand, ...]`` with prefix tokens before operands.

    >>> from cadence.dsl.parser import parse_text
    >>> from cadence.dsl.formatter import format_expr
    >>> format_expr(parse_text("segment s = not a == 1 + 2 * 3 and b ?? c ?? d").blocks[0].condition)
    'not a == 1 + 2 * 3 and b ?? c ?? d'
    """
    pos = 0

    def unary() -> ast.Expr:
        nonlocal pos
        item = seq[pos]
        pos += 1
        if isinstance(item, TOKEN_TYPES):
            if item.type == "NOT":
                operand = parse(NOT_PREC + 1)
                return ast.Unary("not", operand, line=item.line or 0, column=item.column or 0)
            operand = unary()
            return ast.Unary("-", operand, line=item.line or 0, column=item.column or 0)
        return item  # type: ignore[no-any-return]

    def parse(min_prec: int) -> ast.Expr:
        nonlocal pos
        left = unary()
        while pos < len(seq):
            op = _op_name(seq[pos])
            prec = BINARY_PREC[op]
            if prec < min_prec:
                break
            pos += 1
            right = parse(prec if op == "??" else prec + 1)
            left = ast.Binary(op, left, right, line=left.line, column=left.column)
        return left

    return parse(0)


def _tp(tok: Token) -> tuple[int, int]:
    return (tok.line or 0, tok.column or 0)


def _title_and_clauses(rest: tuple[Any, ...]) -> tuple[str | None, list[ast.Clause]]:
    if rest and isinstance(rest[0], TOKEN_TYPES):
        return _decode_string(str(rest[0])), list(rest[1:])
    return None, list(rest)


# ---- splitting and error reporting ---------------------------------------------

_FIRST_WORD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\s+([A-Za-z_][A-Za-z0-9_]*))?")


def _looks_top_level(word: str) -> bool:
    return word in TOP_LEVEL or bool(difflib.get_close_matches(word, TOP_LEVEL, n=1, cutoff=0.75))


def split_blocks(text: str) -> list[tuple[int, str]]:
    """Cut ``text`` into (first line number, block text) at each top-level keyword in column 1.

    >>> [n for n, _ in split_blocks('event a = "A"\\n# note\\nsegment s = true\\n')]
    [1, 2]
    """
    lines = text.split("\n")
    starts: list[int] = []
    pending_comment: int | None = None
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        if line.startswith("#"):
            if pending_comment is None:
                pending_comment = index
            continue
        m = _FIRST_WORD.match(line)
        if m and _looks_top_level(m.group(1)):
            starts.append(pending_comment if pending_comment is not None else index)
        pending_comment = None
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    blocks = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(lines)
        blocks.append((start + 1, "\n".join(lines[start:end])))
    return blocks


def _describe_expected(expected: set[str]) -> str:
    words = sorted(f"'{KEYWORDS[t]}'" for t in expected if t in KEYWORDS)
    others = sorted({_READABLE[t] for t in expected if t in _READABLE})
    items = words + others
    if len(items) > 10:
        items = items[:10] + ["..."]
    return ", ".join(items)


def _syntax_diagnostic(
    exc: UnexpectedInput, file: str, lines: list[str], offset: int, block: str
) -> Diagnostic:
    line = exc.line or 1
    column = exc.column or 1
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        # point just past the last character of the block
        block_lines = block.rstrip().split("\n")
        line = offset + len(block_lines)
        column = len(block_lines[-1]) + 1
        expected = set(getattr(exc, "expected", ()) or ())
        want = _describe_expected(expected)
        hint = "a '}' is probably missing" if "RBRACE" in expected else None
        return _diag("E102", f"the block ends too early; expected {want}", file, lines, line, column, 1, hint)
    if isinstance(exc, UnexpectedToken):
        tok = exc.token
        value = str(tok)
        expected = set(exc.expected)
        want = _describe_expected(expected)
        candidates = [KEYWORDS[t] for t in expected if t in KEYWORDS]
        hint = did_you_mean(value, candidates) if tok.type == "NAME" else None
        if value in UNIT_WORDS:
            hint = f"durations are a number and a unit: write {UNIT_WORDS[value]}"
        elif value == ":":
            hint = "clause keywords are not followed by ':'"
        elif expected == {"STRING"} and tok.type == "NAME":
            hint = f'names of templates, groups and zones are quoted: "{value}"'
        elif expected == {"DOTDOT"}:
            hint = "write a time range with two dots: 22:00..07:00"
        if (
            tok.type == "NAME"
            and column == 1
            and value not in TOP_LEVEL
            and _is_first_code_line(block, line - offset)
        ):
            hint = did_you_mean(value, TOP_LEVEL) or hint
            return _diag(
                "E104",
                f"'{value}' does not start a block; expected one of {', '.join(TOP_LEVEL)}",
                file,
                lines,
                line,
                column,
                len(value),
                hint,
            )
        shown = value if len(value) < 30 else value[:27] + "..."
        return _diag(
            "E101", f"unexpected '{shown}'; expected {want}", file, lines, line, column, len(value), hint
        )
    assert isinstance(exc, UnexpectedCharacters)
    ch = lines[line - 1][column - 1] if 0 < line <= len(lines) and 0 < column <= len(lines[line - 1]) else "?"
    hint = None
    if ch == "'":
        hint = 'strings use double quotes: "like this"'
    elif ch == "&":
        hint = "write 'and'"
    elif ch == "|":
        hint = "write 'or'"
    elif ch == "!":
        hint = "write 'not', or '!=' to compare"
    return _diag("E103", f"unexpected character {ch!r}", file, lines, line, column, 1, hint)


def _diag(
    code: str,
    message: str,
    file: str,
    lines: list[str],
    line: int,
    column: int,
    length: int,
    hint: str | None,
) -> Diagnostic:
    source = lines[line - 1] if 0 < line <= len(lines) else ""
    return Diagnostic(code, message, file, line, column, max(1, length), hint, "error", source)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a burst of short-lived objects is built.

    Parsing and compiling allocate hundreds of thousands of small objects and free
    nearly all of them by reference counting; the collector's passes over them cost
    about a tenth of the time and find nothing. Re-entrant; restores the previous state.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_text(text: str, file: str = "<string>") -> ParsedModule:
    """Parse a whole rule file; syntax errors become diagnostics, one per broken block."""
    with gc_paused():
        return _parse_text(text, file)


def _parse_text(text: str, file: str) -> ParsedModule:
    module = ParsedModule(file=file, text=text)
    lines = text.split("\n")
    parser = grammar()
    for start_line, block in split_blocks(text):
        offset = start_line - 1
        for i, raw in enumerate(block.split("\n") if "#" in block else ()):
            # comments are kept by position for the formatter (strings never span lines)
            pos = _comment_start(raw) if "#" in raw else None
            if pos is not None:
                module.comments.append((offset + i + 1, pos + 1, raw[pos:].rstrip()))
        if not block.strip() or all(
            not ln.strip() or ln.lstrip().startswith("#") for ln in block.split("\n")
        ):
            continue
        try:
            node, errors = _parse_block(parser, block, offset, file, lines)
        except RecursionError:
            module.diagnostics.append(
                _diag("E101", "expression nested too deeply", file, lines, start_line, 1, 1, None)
            )
            continue
        if errors:
            module.diagnostics.extend(errors)
            m = _FIRST_WORD.match(_first_code_line(block))
            if m and m.group(2):
                # a block that failed, or parsed only without its broken clauses: its name
                # is known, but it is not complete enough to judge what is missing
                module.broken[m.group(2)] = m.group(1)
            if node is None:
                continue
        assert node is not None
        if len(block) > MAX_DEPTH * 4 and _depth(node) > MAX_DEPTH:
            # bounded language: the checker, compiler and formatter recurse over expressions
            module.diagnostics.append(
                _diag(
                    "E106",
                    f"an expression is nested more than {MAX_DEPTH} levels deep",
                    file,
                    lines,
                    start_line,
                    1,
                    1,
                    "split it into named segments",
                )
            )
            m = _FIRST_WORD.match(_first_code_line(block))
            if m and m.group(2):
                module.broken[m.group(2)] = m.group(1)
            continue
        module.blocks.append(cast(ast.Block, node))
    return module


#: Words that start a clause inside a braced block (where a broken clause can be skipped).
CLAUSE_WORDS = frozenset(
    [
        "audience",
        "trigger",
        "unless",
        "send",
        "channel",
        "cap",
        "quiet",
        "priority",
        "exclusive",
        "schedule",
        "split",
        "starts",
        "ends",
        "sync",
        "conversion",
        "window",
        "model",
        "credit",
        "weight",
        "exclude",
        "timezone",
        "spacing",
        "given",
        "at",
    ]
)
MAX_RECOVERIES = 20


def _starts_clause(block_lines: list[str], i: int) -> bool:
    m = _FIRST_WORD.match(block_lines[i].lstrip())
    word = m.group(1) if m else ""
    return word in CLAUSE_WORDS or bool(difflib.get_close_matches(word, CLAUSE_WORDS, n=1, cutoff=0.75))


def _clause_range(block_lines: list[str], index: int, column: int = 0) -> tuple[int, int] | None:
    """The lines (start, end exclusive) of the broken clause, for an error at line ``index``.

    An error on the first word of a line that is a correct clause keyword (or ``}``)
    means the clause before it did not end properly: that one is the broken clause.
    """
    if index <= 0 or index >= len(block_lines):
        return None
    line = block_lines[index]
    first = len(line) - len(line.lstrip()) + 1
    word_match = _FIRST_WORD.match(line.lstrip())
    if column == first and word_match and word_match.group(1) in CLAUSE_WORDS and index > 1:
        index -= 1
        while index > 1 and not block_lines[index].strip():
            index -= 1
        start = index
        while start > 1 and not _starts_clause(block_lines, start):
            start -= 1
        return start, index + 1

    def starts_clause(i: int) -> bool:
        m = _FIRST_WORD.match(block_lines[i].lstrip())
        word = m.group(1) if m else ""
        return word in CLAUSE_WORDS or bool(difflib.get_close_matches(word, CLAUSE_WORDS, n=1, cutoff=0.75))

    if block_lines[index].lstrip().startswith("}"):
        # the error is at the closing brace: the clause before it is the broken one
        index -= 1
        while index > 1 and not block_lines[index].strip():
            index -= 1
        start = index
        while start > 1 and not starts_clause(start):
            start -= 1
        return start, index + 1
    start = index
    while start > 1 and not starts_clause(start):
        start -= 1
    end = index + 1
    while end < len(block_lines) and not starts_clause(end) and not block_lines[end].lstrip().startswith("}"):
        end += 1
    return start, end


def _parse_block(
    parser: Lark, block: str, offset: int, file: str, lines: list[str]
) -> tuple[Any, list[Diagnostic]]:
    """Parse one block; on an error inside braces, skip that clause and go on to find the next error.

    Returns the tree (None when the block could not be parsed at all) and the syntax errors.
    """
    errors: list[Diagnostic] = []
    block_lines = block.split("\n")
    for _ in range(MAX_RECOVERIES):
        try:
            # padding with newlines keeps lark's line numbers true to the file
            return parser.parse("\n" * offset + "\n".join(block_lines)), errors
        except UnexpectedInput as exc:
            errors.append(_syntax_diagnostic(exc, file, lines, offset, "\n".join(block_lines)))
            if (
                "{" not in block_lines[0]
                or isinstance(exc, UnexpectedEOF)
                or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END")
            ):
                return None, errors
            span = _clause_range(block_lines, (exc.line or 1) - offset - 1, exc.column or 0)
            if span is None:
                return None, errors
            for i in range(*span):
                block_lines[i] = ""
    return None, errors


def _depth(root: Any) -> int:
    """The deepest nesting of AST nodes under ``root`` (iterative: safe on any input)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, ast.Node):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((getattr(item, f.name), depth) for f in fields(item))
        elif isinstance(item, list | tuple):
            stack.extend((x, depth) for x in item)
        elif isinstance(item, dict):
            stack.extend((x, depth) for x in item.values())
    return deepest


def _is_first_code_line(block: str, number: int) -> bool:
    for i, line in enumerate(block.split("\n"), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            return i == number
    return False


def _first_code_line(block: str) -> str:
    for line in block.split("\n"):
        if line.strip() and not line.lstrip().startswith("#"):
            return line
    return ""


def _comment_start(line: str) -> int | None:
    """Where a ``#`` comment starts in ``line``, ignoring ``#`` inside strings."""
    in_string = False
    escaped = False
    for i, ch in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "#":
            return i
    return None
