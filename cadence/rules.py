"""A rule set: every cadence in a folder, checked together (transitions, templates), loaded all or nothing."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from cadence import sandbox, timing
from cadence.errors import Problem, RulesError
from cadence.language import CadenceSpec, Parsed, parse
from cadence.policy import POLICY_FILE, Policy
from cadence.policy import parse as parse_policy
from channels import PARTS

if TYPE_CHECKING:
    from cadence.crm.mapping import CrmMap

#: The file name of the CRM mapping (cadence/crm/mapping.py) inside a rules folder. The CRM package is
#: imported only when needed: it needs the engine, and the engine needs this module.
CRM_FILE = "crm.yaml"


def _default_crm() -> CrmMap:
    from cadence.crm.mapping import CrmMap

    return CrmMap()


@dataclass(frozen=True)
class RuleSet:
    cadences: dict[str, Parsed]
    policy: Policy = field(default_factory=Policy)
    #: How each CRM's stages, statuses and fields read as Cadence's (`crm.yaml`).
    crm: CrmMap = field(default_factory=_default_crm)

    def get(self, name: str) -> CadenceSpec:
        return self.cadences[name].spec

    def __contains__(self, name: str) -> bool:
        return name in self.cadences


def rule_files(paths: Iterable[Path]) -> list[Path]:
    """Every YAML file named, or inside a folder named; the policy and CRM files are not cadences."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.y*ml") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _check_templates(parsed: Parsed, templates_dir: Path, env: jinja2.Environment) -> list[Problem]:
    problems = []
    for path, point in parsed.spec.touchpoints():
        for where, channel, template in point.uses(path):
            line, column = parsed.where(where)
            for ext in PARTS[channel].values():
                name = f"{template}{ext}"
                try:
                    env.get_template(name)
                except jinja2.TemplateNotFound:
                    problems.append(
                        Problem(
                            parsed.file,
                            line,
                            column,
                            f"template file {name} not found in {templates_dir}",
                            f"create {templates_dir / name}",
                        )
                    )
                except jinja2.TemplateSyntaxError as exc:
                    problems.append(Problem(parsed.file, line, column, f"{name}:{exc.lineno}: {exc.message}"))
    return problems


def _check_quiet_hours(parsed: Parsed, policy: Policy) -> list[Problem]:
    problems = []
    for path, point in parsed.spec.touchpoints():
        for channel in sorted(point.channels()):
            hours = policy.hours(channel)
            if hours is None:
                continue
            try:
                timing.for_step(parsed.spec.calendar, point.window, hours)
            except ValueError as exc:
                name = ".".join(str(p) for p in path)
                problems.append(
                    Problem(
                        parsed.file,
                        *parsed.where((*path, "channel") if point.channel else (*path, "choose")),
                        f"{name}: the policy's {channel} {exc}",
                        "widen the cadence's window or the policy's quiet_hours",
                    )
                )
    return problems


def _known(name: str, parsed: dict[str, Parsed]) -> str:
    """A hint for an unknown cadence name: the closest known ones, not all of a large rule set."""
    close = difflib.get_close_matches(name, list(parsed), n=3)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    if not parsed:
        return "no cadences are loaded"
    few = sorted(parsed)[:5]
    more = f" and {len(parsed) - len(few)} more" if len(parsed) > len(few) else ""
    return f"known cadences: {', '.join(few)}{more}"


def load(paths: Iterable[Path], templates_dir: Path) -> RuleSet:
    """Parse and cross-check every file; raises RulesError with every problem, so nothing half-loads."""
    from cadence.crm import mapping

    problems: list[Problem] = []
    parsed: dict[str, Parsed] = {}
    env = sandbox.template_environment(templates_dir)
    policy = Policy()
    crm = mapping.CrmMap()
    for path in rule_files(paths):
        file = _display(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(file, 1, 1, f"cannot read: {exc}"))
            continue
        try:
            if path.name == POLICY_FILE:
                policy = parse_policy(text, file)
                continue
            if path.name == CRM_FILE:
                crm = mapping.parse(text, file)
                continue
            one = parse(text, file)
        except RulesError as exc:
            problems.extend(exc.problems)
            continue
        name = one.spec.cadence
        if name in parsed:
            line, column = one.where(("cadence",))
            problems.append(
                Problem(file, line, column, f"cadence {name!r} is also defined in {parsed[name].file}")
            )
            continue
        parsed[name] = one
        problems.extend(_check_templates(one, templates_dir, env))
    for one in parsed.values():
        problems.extend(_check_quiet_hours(one, policy))
    for one in parsed.values():
        for where, _, target in one.spec.transitions():
            if target not in parsed:
                line, column = one.where(where)
                problems.append(
                    Problem(
                        one.file,
                        line,
                        column,
                        f"{'.'.join(str(p) for p in where)} names unknown cadence {target!r}",
                        _known(target, parsed),
                    )
                )
    if problems:
        raise RulesError(problems)
    return RuleSet(parsed, policy, crm)
