"""``cadence fmt``: one canonical layout for every rule file, comments kept.

The layout is a function of the syntax tree alone: clause keywords padded so their
values line up, one blank line between blocks, long ``and``/``or`` chains broken one
condition per line. Comments are re-attached by line: a comment at the end of a
line stays at the end of the line that now holds the same clause (or condition); a
comment on its own line stays before what followed it. Formatting is idempotent:
``format(format(x)) == format(x)``.

>>> print(format_text('segment  vip "VIPs"=customer.tier??""=="gold"  # top'), end="")
segment vip "VIPs" = customer.tier ?? "" == "gold"  # top
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cadence.dsl import ast
from cadence.dsl.parser import ParsedModule, parse_text

__all__ = ["format_expr", "format_module", "format_text"]

PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "??": 5, "+": 6, "-": 6, "*": 7, "/": 7, "neg": 8, "post": 9}
CMP_OPS = {"==", "!=", ">", "<", ">=", "<=", "in", "not in", "matches"}
CHAIN_LIMIT = 90


def _prec(node: ast.Expr) -> int:
    if isinstance(node, ast.Binary):
        if node.op in CMP_OPS:
            return PREC["cmp"]
        if node.op == "within":
            return PREC["post"]
        return PREC[node.op]
    if isinstance(node, ast.Between):
        return PREC["post"]
    if isinstance(node, ast.Unary):
        return {"not": PREC["not"], "-": PREC["neg"], "ago": PREC["post"]}[node.op]
    return 10


def format_expr(node: ast.Expr, minimum: int = 0) -> str:
    """The canonical text of an expression; parenthesised when its precedence is below ``minimum``.

    >>> from cadence.dsl.parser import parse_text
    >>> seg = parse_text("segment s = (a or b) and not c within 7d").blocks[0]
    >>> format_expr(seg.condition)
    '(a or b) and not c within 7d'
    """
    text = _expr(node)
    return f"({text})" if _prec(node) < minimum else text


def _expr(node: ast.Expr) -> str:  # noqa: C901 - one case per node kind
    if isinstance(node, ast.Lit):
        return node.text
    if isinstance(node, ast.Path):
        return ".".join(node.parts)
    if isinstance(node, ast.Call):
        return f"{node.name}({', '.join(format_expr(a) for a in node.args)})"
    if isinstance(node, ast.SetLit):
        return "[" + ", ".join(format_expr(i) for i in node.items) + "]"
    if isinstance(node, ast.Between):
        return (
            f"{format_expr(node.subject, 10)} between {format_expr(node.older, 6)} "
            f"and {format_expr(node.newer, 6)} ago"
        )
    if isinstance(node, ast.Unary):
        if node.op == "not":
            return f"not {format_expr(node.operand, PREC['not'])}"
        if node.op == "-":
            return f"-{format_expr(node.operand, PREC['neg'])}"
        return f"{format_expr(node.operand, 10)} ago"
    op = node.op
    if op == "within":
        return f"{format_expr(node.left, 10)} within {format_expr(node.right, PREC['neg'])}"
    if op in CMP_OPS:
        return f"{format_expr(node.left, 5)} {op} {format_expr(node.right, 5)}"
    if op == "??":
        return f"{format_expr(node.left, 6)} ?? {format_expr(node.right, 5)}"
    p = PREC[op]
    return f"{format_expr(node.left, p)} {op} {format_expr(node.right, p + 1)}"


def _chain(node: ast.Expr) -> tuple[str | None, list[ast.Expr]]:
    """A top-level and/or chain flattened: ``a and b and c`` -> ("and", [a, b, c])."""
    if not (isinstance(node, ast.Binary) and node.op in ("and", "or")):
        return None, [node]
    op = node.op
    items: list[ast.Expr] = []

    def walk(n: ast.Expr) -> None:
        if isinstance(n, ast.Binary) and n.op == op:
            walk(n.left)
            items.append(n.right)
        else:
            items.append(n)

    walk(node)
    return op, items


@dataclass
class _Unit:
    """One output line and the source line it came from (for re-attaching comments)."""

    anchor: int
    text: str
    indent: int


class _Writer:
    def __init__(self) -> None:
        self.units: list[_Unit] = []

    def line(self, anchor: int, text: str, indent: int = 0) -> None:
        self.units.append(_Unit(anchor, " " * indent + text, indent))

    def blank(self) -> None:
        self.units.append(_Unit(-1, "", 0))

    def condition(self, anchor: int, head: str, node: ast.Expr, indent: int, cont_indent: int) -> None:
        """``head`` followed by a condition, broken one operand per line when long."""
        op, items = _chain(node)
        one_line = head + format_expr(node)
        if op is None or len(items) < 2 or indent + len(one_line) <= CHAIN_LIMIT:
            self.line(anchor, one_line, indent)
            return
        p = PREC[op]
        first, *rest = items
        self.line(anchor, head + format_expr(first, p), indent)
        for item in rest:
            self.line(item.line or anchor, f"{op} {format_expr(item, p + 1)}", cont_indent)


def _title(title: str | None) -> str:
    if title is None:
        return ""
    return " " + _quote(title)


def _quote(text: str) -> str:
    """A string literal for ``text``.

    >>> _quote('say "hi"')
    '"say \\\\"hi\\\\""'
    """
    return (
        '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'
    )


def _vars(items: list[Any]) -> str:
    return ", ".join(f"{name}: {format_expr(expr)}" for name, expr, *_ in items)


def _props(items: tuple[tuple[str, ast.Expr], ...]) -> str:
    return " { " + ", ".join(f"{n}: {format_expr(e)}" for n, e in items) + " }" if items else ""


def _tpred(pred: tuple[Any, ...], minimum: int = 0) -> str:
    kind = pred[0]
    if kind == "quant":
        _k, quant, fname, op, value, _pos = pred
        return f"{quant} touch.{fname} {op} {_quote(value)}"
    if kind == "not":
        return f"not {_tpred(pred[1], 3)}"
    p = PREC[kind]
    text = f"{_tpred(pred[1], p)} {kind} {_tpred(pred[2], p + 1)}"
    return f"({text})" if p < minimum else text


def _clause(w: _Writer, clause: ast.Clause, width: int) -> None:  # noqa: C901 - one case per clause
    kw, a = clause.keyword, clause.args
    head = kw.ljust(width)
    cont = 4 + width
    anchor = clause.line
    if kw in ("audience", "unless"):
        w.condition(anchor, head, a["expr"], 4, cont)
    elif kw in ("priority", "starts", "ends", "window", "spacing"):
        w.line(anchor, head + format_expr(a["expr"]), 4)
    elif kw == "trigger":
        text = f"on {format_expr(a['event'])}"
        if a["where"] is not None:
            text += f" where {format_expr(a['where'])}"
        if a["after"] is not None:
            text += f" after {format_expr(a['after'])}"
        w.line(anchor, head + text, 4)
    elif kw == "send":
        text = f"template {_quote(a['template'])}"
        if a["vars"]:
            text += " with { " + _vars(a["vars"]) + " }"
        w.line(anchor, head + text, 4)
    elif kw == "sync":
        text = f"audience to {a['channel'][0]}"
        if a["vars"]:
            text += " with { " + _vars(a["vars"]) + " }"
        w.line(anchor, head + text, 4)
    elif kw == "channel":
        names = [n for n, _p in a["channels"]]
        text = "best of [" + ", ".join(names) + "]" if a["mode"] == "best" else ", fallback ".join(names)
        w.line(anchor, head + text, 4)
    elif kw == "cap":
        text = f"{format_expr(a['count'], 5)} per {format_expr(a['window'], 5)}"
        if a["on"] is not None:
            text += f" on {a['on'][0]}"
        if a.get("calendar") is not None:
            text += " calendar"
        w.line(anchor, head + text, 4)
    elif kw == "quiet":
        text = f"{format_expr(a['start'], 5)}..{format_expr(a['end'], 5)}"
        if a["zone"] is not None:
            text += f" in {format_expr(a['zone'], 5)}"
        if a["action"] is not None:
            text += f" then {a['action'][0]}"
        w.line(anchor, head + text, 4)
    elif kw == "exclusive":
        w.line(anchor, head + _quote(a["group"]), 4)
    elif kw == "schedule":
        text = f"every {a['every'][0]}"
        if a["at"] is not None:
            text += f" at {format_expr(a['at'], 5)}"
        if a["zone"] is not None:
            text += f" in {format_expr(a['zone'], 5)}"
        w.line(anchor, head + text, 4)
    elif kw == "split":
        arms = []
        for arm in a["arms"]:
            arms.append(
                f"{arm.name} {format_expr(arm.share, 5)}"
                + (f" template {_quote(arm.template)}" if arm.template is not None else "")
            )
        w.line(anchor, head + ("learned " if a.get("learned") else "") + ", ".join(arms), 4)
    elif kw == "conversion":
        text = format_expr(a["event"])
        if a["value"] is not None:
            text += f" value {a['value'][0]}.{a['value'][1]}"
        w.line(anchor, head + text, 4)
    elif kw == "model":
        text = a["name"]
        if a["params"]:
            text += "(" + _vars(a["params"]) + ")"
        w.line(anchor, head + text, 4)
    elif kw == "channel_rule":
        matches = ", ".join(f"{f} {op} {_quote(v)}" for f, op, v, _p in a["when"])
        w.line(anchor, "channel".ljust(width) + f"{a['channel']} when {matches}", 4)
    elif kw in ("credit", "weight", "exclude"):
        text = a["channel"]
        if a["value"] is not None:
            text += f" {format_expr(a['value'], 5)}"
        if a["when"] is not None:
            text += f" when {_tpred(a['when'])}"
        w.line(anchor, head + text, 4)
    elif kw == "timezone":
        w.line(anchor, head + _quote(a["zone"]), 4)


def _moment(m: ast.Moment) -> str:
    if m.absolute is not None:
        return m.absolute + (f" {m.zone}" if m.zone else "")
    sign = "-" if m.offset_ms < 0 else "+"
    return sign + m.text.lstrip("+-")


def _fixture(f: ast.Fixture) -> str:
    return f"{format_expr(f.event)} at {_moment(f.at)}{_props(f.props)}"


def _expectation(s: ast.Step) -> str:
    if s.expect == "send":
        return (
            f"send {s.target}"
            + (f" via {s.channel}" if s.channel else "")
            + (f" at {s.send_time}" if s.send_time else "")
        )
    if s.expect == "no_send":
        return "no send" + (f" because {s.reason}({s.reason_campaign})" if s.reason else "")
    return {
        "eligible": "eligible ",
        "not_eligible": "not eligible ",
        "member": "in ",
        "not_member": "not in ",
    }[s.expect] + str(s.target)


def _block(w: _Writer, block: ast.Block, end_line: int) -> None:  # noqa: C901
    if isinstance(block, ast.Import):
        w.line(block.line, f"import {_quote(block.path)}" + (f" as {block.alias}" if block.alias else ""))
    elif isinstance(block, ast.EventAlias):
        w.line(block.line, f"event {block.name} = {_quote(block.event)}")
    elif isinstance(block, ast.Segment):
        head = f"segment {block.name}{_title(block.title)} = "
        op, items = _chain(block.condition)
        if op is not None and len(items) >= 2 and len(head + format_expr(block.condition)) > CHAIN_LIMIT:
            w.line(block.line, head.rstrip())
            w.condition(items[0].line or block.line, "", block.condition, 4, 4)
        else:
            w.line(block.line, head + format_expr(block.condition))
    elif isinstance(block, ast.Campaign | ast.Attribution | ast.Settings):
        if isinstance(block, ast.Settings):
            w.line(block.line, "settings {")
            width = 10
        else:
            kind = "campaign" if isinstance(block, ast.Campaign) else "attribution"
            w.line(block.line, f"{kind} {block.name}{_title(block.title)} {{")
            width = 10 if isinstance(block, ast.Campaign) else 12
        for clause in block.clauses:
            _clause(w, clause, width)
        w.line(end_line, "}")
    elif isinstance(block, ast.Test):
        w.line(block.line, f"test {_quote(block.name)} {{")
        if block.customer:
            w.line(block.customer_pos[0], "given customer { " + _vars(list(block.customer)) + " }", 4)
        if block.events:
            one = "given events { " + "; ".join(_fixture(f) for f in block.events) + " }"
            if len(one) + 4 <= CHAIN_LIMIT + 20:
                w.line(block.events[0].line, one, 4)
            else:
                w.line(block.events[0].line, "given events {", 4)
                for f in block.events:
                    w.line(f.line, _fixture(f), 8)
                w.line(block.events[-1].line, "}", 4)
        for step in block.steps:
            text = f"at {_moment(step.at)}"
            if step.trigger is not None:
                text += f" on {format_expr(step.trigger.event)}{_props(step.trigger.props)}"
            w.line(step.line, f"{text} expect {_expectation(step)}", 4)
        w.line(end_line, "}")


def format_module(module: ParsedModule) -> str:
    """The canonical text of a parsed module (which must have no syntax errors)."""
    w = _Writer()
    ends = _block_ends(module)
    for i, block in enumerate(module.blocks):
        one_liners = (ast.Import, ast.EventAlias)
        if i and not (isinstance(block, one_liners) and type(block) is type(module.blocks[i - 1])):
            w.blank()
        _block(w, block, ends[i])
    lines = module.text.split("\n")
    comments = [
        (line, text, not lines[line - 1][: column - 1].strip()) for line, column, text in module.comments
    ]
    return _with_comments(w.units, comments)


def _block_ends(module: ParsedModule) -> list[int]:
    """The last code line of each block (its closing brace for braced blocks)."""
    lines = module.text.split("\n")
    starts = [b.line for b in module.blocks] + [len(lines) + 1]
    ends = []
    for i in range(len(module.blocks)):
        end = starts[i]
        for n in range(starts[i], starts[i + 1]):
            stripped = lines[n - 1].strip()
            if stripped and not stripped.startswith("#"):
                end = n
        ends.append(end)
    return ends


def _with_comments(units: list[_Unit], comments: list[tuple[int, str, bool]]) -> str:
    trailing: dict[int, list[str]] = {}
    before: dict[int, list[tuple[int, str]]] = {}
    after: list[str] = []
    code_units = [i for i, u in enumerate(units) if u.anchor >= 0]
    for line, text, own_line in comments:
        if not own_line:
            # trailing: the last unit whose anchor is at or before the comment's line
            target = None
            for i in code_units:
                if units[i].anchor <= line:
                    target = i
            if target is not None:
                trailing.setdefault(target, []).append(text)
                continue
        nxt = next((i for i in code_units if units[i].anchor > line), None)
        if nxt is None:
            after.append(text)
        else:
            before.setdefault(nxt, []).append((units[nxt].indent, text))
    out: list[str] = []
    for i, unit in enumerate(units):
        if i in before:
            out.extend(" " * indent + text for indent, text in before[i])
        text = unit.text
        if i in trailing:
            text += "  " + "  ".join(trailing[i])
        out.append(text)
    out.extend(after)
    return "\n".join(out).rstrip("\n") + "\n"


def format_text(text: str, file: str = "<string>") -> str:
    """Parse and format ``text``; raises ``ValueError`` on a syntax error."""
    module = parse_text(text, file)
    if module.diagnostics:
        raise ValueError(f"{file} has syntax errors; run `cadence check` first")
    return format_module(module)
