"""Load rule files: read, follow imports, parse, check, compile, hash; reload atomically.

:func:`load_rules` is the one entry point the CLI, the API and the engine use. It
never raises on bad rules: it returns a :class:`LoadResult` whose ``diagnostics``
say what is wrong, and whose ``ruleset`` is set only when there is no error.
:class:`RulesetHolder` keeps the current ruleset of a rule directory and swaps in a
new one only when the sources changed *and* compile cleanly, in one assignment, so
a reader sees either the old or the new ruleset, never a mix.

>>> result = load_source('segment everyone = true')
>>> result.ok, sorted(result.ruleset.segments)
(True, ['everyone'])
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cadence.channels import CHANNELS
from cadence.dsl import ast
from cadence.dsl.checker import Checker, ModuleScope
from cadence.dsl.compiler import (
    Codegen,
    compile_attribution,
    compile_campaign,
    compile_segment,
    compile_settings,
)
from cadence.dsl.diagnostics import Diagnostic, did_you_mean, sort_diagnostics
from cadence.dsl.parser import ParsedModule, gc_paused, parse_text
from cadence.engine.campaign import CompiledRuleset
from cadence.errors import RuleError

__all__ = ["LoadResult", "RulesetHolder", "content_hash", "discover", "load_rules", "load_source"]

SUFFIX = ".cadence"


@dataclass
class LoadResult:
    """What loading produced: the ruleset (when there is no error) and every diagnostic."""

    ruleset: CompiledRuleset | None
    diagnostics: list[Diagnostic]
    modules: list[ParsedModule] = field(default_factory=list)
    scopes: list[ModuleScope] = field(default_factory=list)
    hash: str = ""
    used_segments: set[str] = field(default_factory=set)

    @property
    def errors(self) -> list[Diagnostic]:
        """Diagnostics of severity error."""
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors and self.ruleset is not None

    def raise_for_errors(self) -> CompiledRuleset:
        """The ruleset, or :class:`~cadence.errors.RuleError` carrying the diagnostics."""
        if self.ruleset is None or self.errors:
            first = self.errors[0] if self.errors else None
            raise RuleError(
                f"{len(self.errors)} error(s) in rules" + (f"; first: {first}" if first else ""),
                diagnostics=list(self.diagnostics),
            )
        return self.ruleset


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``.cadence`` file named or inside a named directory, sorted, without duplicates."""
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob(f"*{SUFFIX}")):
                found[child.resolve()] = None
        else:
            found[path.resolve()] = None
    return list(found)


def content_hash(sources: Mapping[str, str]) -> str:
    """SHA-256 over the file names and texts, independent of the order they were read in.

    >>> content_hash({"a": "x"}) == content_hash({"a": "x"}) != content_hash({"a": "y"})
    True
    """
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(sources[name].encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _display(path: Path, root: Path | None) -> str:
    try:
        return str(path.relative_to(root or Path.cwd()))
    except ValueError:
        return str(path)


def load_rules(
    paths: Iterable[str | Path],
    *,
    available_channels: Collection[str] = CHANNELS,
    known_events: Collection[str] | None = None,
    default_zone: str = "UTC",
    sources: Mapping[str, str] | None = None,
) -> LoadResult:
    """Load the rule files at ``paths`` (files or directories) and everything they import.

    :param available_channels: channels an installed connector offers; others are errors.
    :param known_events: event names seen in the log; when given, other names are warned about.
    :param sources: in-memory texts by file name, used instead of reading the disk.
    """
    with gc_paused():
        return _load_rules(
            paths,
            available_channels=available_channels,
            known_events=known_events,
            default_zone=default_zone,
            sources=sources,
        )


def _load_rules(
    paths: Iterable[str | Path],
    *,
    available_channels: Collection[str],
    known_events: Collection[str] | None,
    default_zone: str,
    sources: Mapping[str, str] | None,
) -> LoadResult:
    texts: dict[str, str] = {}
    modules: dict[str, ParsedModule] = {}
    diagnostics: list[Diagnostic] = []
    import_edges: list[tuple[str, ast.Import, str]] = []

    def read(key: str) -> str | None:
        if sources is not None and key in sources:
            return sources[key]
        try:
            return Path(key).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    queue: list[str]
    if sources is not None and not list(paths):
        queue = list(sources)
    else:
        queue = [str(p) for p in discover(paths)] if sources is None else [str(p) for p in paths]
    displays: dict[str, str] = {}
    while queue:
        key = queue.pop(0)
        if key in modules:
            continue
        text = read(key)
        display = displays.get(key) or (_display(Path(key), None) if sources is None else key)
        if text is None:
            diagnostics.append(Diagnostic("E205", f"cannot read rule file '{display}'", display, 1, 1))
            modules[key] = ParsedModule(display, "")
            continue
        texts[display] = text
        module = parse_text(text, display)
        modules[key] = module
        for block in module.blocks:
            if isinstance(block, ast.Import):
                target = block.path
                if sources is None:
                    target = str((Path(key).parent / block.path).resolve())
                    displays.setdefault(target, _display(Path(target), None))
                import_edges.append((key, block, target))
                if sources is not None and target not in sources and not Path(target).exists():
                    continue
                if sources is None and not Path(target).exists():
                    continue
                queue.append(target)

    scopes = {key: ModuleScope(module) for key, module in modules.items()}
    for scope in scopes.values():
        diagnostics.extend(scope.module.diagnostics)
    checker = Checker(list(scopes.values()), available_channels=available_channels, known_events=known_events)

    # definitions, with duplicates reported at the second one
    first_def: dict[tuple[str, str], tuple[str, int]] = {}
    for scope in scopes.values():
        checker._current = scope.module
        for block in scope.module.blocks:
            if isinstance(block, ast.EventAlias | ast.Segment | ast.Campaign | ast.Attribution):
                kind = {
                    ast.EventAlias: "event",
                    ast.Segment: "segment",
                    ast.Campaign: "campaign",
                    ast.Attribution: "attribution",
                }[type(block)]
                # campaigns, segments and attributions are global; event aliases belong to their file
                space = f"event:{scope.module.file}" if kind == "event" else kind
                key2 = (space, block.name)
                if (
                    kind == "segment"
                    and block.name in scope.aliases
                    or kind == "event"
                    and (block.name in scope.segments)
                ):
                    checker.at(
                        block,
                        "E204",
                        f"'{block.name}' is both an event and a segment in this file",
                        len(kind),
                    )
                    continue
                if key2 in first_def:
                    where, line = first_def[key2]
                    checker.at(
                        block,
                        "E204",
                        f"{kind} '{block.name}' is already defined at {where}:{line}",
                        len(kind),
                    )
                    continue
                first_def[key2] = (scope.module.file, block.line)
                getattr(
                    scope,
                    {
                        "event": "aliases",
                        "segment": "segments",
                        "campaign": "campaigns",
                        "attribution": "attributions",
                    }[kind],
                )[block.name] = block
    for source_key, imp, target in import_edges:
        scope = scopes[source_key]
        checker._current = scope.module
        if target not in scopes or not scopes[target].module.text and target not in texts:
            siblings = []
            base = Path(source_key).parent
            if sources is None and base.is_dir():
                siblings = [p.name for p in base.glob(f"*{SUFFIX}")]
            elif sources is not None:
                siblings = list(sources)
            checker.at(
                imp,
                "E205",
                f"cannot import '{imp.path}': no such file",
                len("import"),
                did_you_mean(imp.path, siblings),
            )
            # what the file would have defined is unknown: do not report each use of it again
            scope.module.broken[imp.alias or "*"] = "import"
            continue
        if imp.alias is None:
            scope.open_imports.append(scopes[target])
        elif imp.alias in scope.named_imports:
            checker.at(imp, "E204", f"the alias '{imp.alias}' is already used", len("import"))
        else:
            scope.named_imports[imp.alias] = scopes[target]
    try:
        checker.run()
    except RecursionError:
        # only a pathologically nested expression gets here; name the file rather than crash
        checker.diagnostics.append(
            Diagnostic(
                "E101", "an expression is nested too deeply", next(iter(scopes.values())).module.file, 1, 1
            )
        )
    diagnostics.extend(checker.diagnostics)
    diagnostics = sort_diagnostics(diagnostics)
    digest = content_hash(texts)
    result = LoadResult(
        None, diagnostics, list(modules.values()), list(scopes.values()), digest, checker.used_segments
    )
    if any(d.severity == "error" for d in diagnostics):
        return result
    try:
        ruleset = build_ruleset(
            list(scopes.values()),
            digest=digest,
            default_zone=checker.default_zone if _has_timezone(scopes.values()) else default_zone,
        )
    except (RecursionError, MemoryError, SyntaxError) as exc:
        # the generated module is too deep for Python's own compiler: report, do not crash
        result.diagnostics.append(
            Diagnostic(
                "E101",
                f"the rules are too deeply nested to compile ({type(exc).__name__})",
                next(iter(scopes.values())).module.file,
                1,
                1,
            )
        )
        return result
    result.ruleset = ruleset
    return result


def _has_timezone(scopes: Iterable[ModuleScope]) -> bool:
    return any(
        c.keyword == "timezone"
        for s in scopes
        for b in s.module.blocks
        if isinstance(b, ast.Settings)
        for c in b.clauses
    )


def build_ruleset(scopes: Sequence[ModuleScope], *, digest: str, default_zone: str) -> CompiledRuleset:
    """Compile checked scopes into one immutable ruleset."""
    gen = Codegen(default_zone=default_zone)
    segments_ast = [(s.module.file, b) for s in scopes for b in s.module.blocks if isinstance(b, ast.Segment)]
    for _file, block in segments_ast:
        gen.segment_funcs[block.name] = gen.fresh("_s")
        gen.segment_ast[block.name] = block.condition
    segments = {b.name: compile_segment(gen, b, f) for f, b in segments_ast}
    campaigns = {
        b.name: compile_campaign(gen, b, s.module.file, default_zone)
        for s in scopes
        for b in s.module.blocks
        if isinstance(b, ast.Campaign)
    }
    attribution = {
        b.name: compile_attribution(gen, b, s.module.file)
        for s in scopes
        for b in s.module.blocks
        if isinstance(b, ast.Attribution)
    }
    settings = compile_settings(
        [b for s in scopes for b in s.module.blocks if isinstance(b, ast.Settings)], default_zone
    )
    gen.build(f"<cadence ruleset {digest[:12]}>")
    aliases = {name: a.event for s in scopes for name, a in s.aliases.items()}
    return CompiledRuleset(
        hash=digest,
        campaigns=campaigns,
        segments=segments,
        settings=settings,
        aggregates=frozenset(gen.aggregates),
        event_aliases=aliases,
        attribution=attribution,
        files=tuple(s.module.file for s in scopes),
    )


def load_source(
    text: str,
    *,
    file: str = "rules.cadence",
    available_channels: Collection[str] = CHANNELS,
    known_events: Collection[str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> LoadResult:
    """Load rules from a string (and other in-memory files it may import)."""
    return load_rules(
        [file],
        sources={file: text, **(extra or {})},
        available_channels=available_channels,
        known_events=known_events,
    )


class RulesetHolder:
    """The current ruleset of some rule paths, reloaded atomically.

    ``current`` is replaced in one assignment, and only by a ruleset that compiled
    without errors; a failed reload keeps the old one and returns the diagnostics.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        available_channels: Collection[str] = CHANNELS,
        default_zone: str = "UTC",
    ) -> None:
        self.paths = list(paths)
        self.available_channels = tuple(available_channels)
        self.default_zone = default_zone
        self.current: CompiledRuleset | None = None
        self._lock = threading.Lock()

    def reload(self) -> LoadResult:
        """Load the paths again; swap the ruleset in when it changed and has no error."""
        with self._lock:
            result = load_rules(
                self.paths, available_channels=self.available_channels, default_zone=self.default_zone
            )
            if result.ruleset is not None and (self.current is None or self.current.hash != result.hash):
                self.current = result.ruleset
            return result
