"""Command-line flags and environment variables, generated from the config dataclasses.

`settings()` turns every field of `WorkerConfig` and its sections (`EngineConfig`,
`RequestLimits`, `KafkaSettings`) into a `Setting`: flag, environment variable, type, default,
and help text read from the field's docstring, so a new field is a new flag, variable and row in
docs/configuration.md with nothing else to edit. The environment is read here, once per command
(`resolve_settings`); precedence is flag, then variable, then a config file (`--config FILE`,
e.g. what `streamer tune` writes), then default.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

from streamer.config import (
    CacheConfig,
    EngineConfig,
    GatewayConfig,
    KafkaSettings,
    WorkerConfig,
)
from streamer.validation import RequestLimits


class Section(NamedTuple):
    """A settings dataclass inside WorkerConfig, and how its fields are named outside."""

    attr: str
    """Attribute of WorkerConfig holding it; "" for WorkerConfig's own fields."""
    cls: type
    env_prefix: str
    flag_prefix: str
    title: str


SECTIONS = (
    Section("engine", EngineConfig, "STREAMER_", "--", "Engine"),
    Section("", WorkerConfig, "STREAMER_", "--", "Worker"),
    Section("limits", RequestLimits, "STREAMER_", "--", "Request limits"),
    Section("kafka", KafkaSettings, "STREAMER_KAFKA_", "--kafka-", "Kafka"),
    Section("cache", CacheConfig, "STREAMER_CACHE_", "--cache-", "Result cache"),
)
"""Every section, in documentation order. A field's names can be changed with field metadata:
"env", "flag" (None: environment only) and "aliases" (more flags)."""

GATEWAY_SECTIONS = (
    Section("", GatewayConfig, "STREAMER_GATEWAY_", "--", "Gateway"),
    Section("kafka", KafkaSettings, "STREAMER_KAFKA_", "--kafka-", "Kafka"),
)
"""`streamer gateway`'s settings: GatewayConfig and the same Kafka section as the worker's."""

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One settings field as the command line and the environment see it."""

    section: str
    """Attribute of WorkerConfig that holds the field ("" for WorkerConfig's own)."""
    name: str
    """Field name, unique across sections; also the argparse dest."""
    hint: Any
    """The field's type, e.g. int, int | None, tuple[str, ...]."""
    default: Any
    help: str
    """The field's docstring, on one line."""
    env: str
    flag: str | None
    """None: environment only."""
    aliases: tuple[str, ...] = ()
    secret: bool = False
    """Excluded from the dataclass repr: never printed."""

    @property
    def optional(self) -> bool:
        return get_origin(self.hint) in (Union, types.UnionType) and type(None) in get_args(
            self.hint
        )

    @property
    def inner(self) -> Any:
        """The type without None: int | None -> int."""
        if not self.optional:
            return self.hint
        (inner,) = [a for a in get_args(self.hint) if a is not type(None)]
        return inner

    @property
    def kind(self) -> type:
        """int, float, str, bool or tuple."""
        return get_origin(self.inner) or self.inner

    @property
    def item(self) -> type:
        """The element type of a tuple, else the kind."""
        return get_args(self.inner)[0] if self.kind is tuple else self.kind

    def parse(self, raw: str) -> Any:
        """A flag's or variable's text as the field's type; ValueError says what was expected.
        For optional non-text fields, "" and "none" mean None."""
        text = raw.strip()
        if self.optional and self.item is not str and text.lower() in ("", "none"):
            return None
        if self.kind is tuple:
            return tuple(_scalar(self.item, x.strip()) for x in text.split(",") if x.strip())
        return _scalar(self.kind, raw if self.kind is str else text)

    @property
    def off_flag(self) -> str | None:
        """`--no-x` for a boolean `--x`."""
        return f"--no-{self.flag.removeprefix('--')}" if self.kind is bool and self.flag else None

    @property
    def metavar(self) -> str | None:
        names = {int: "INT", float: "NUMBER", str: "TEXT"}
        if self.kind is bool:
            return None
        if self.kind is tuple:
            return f"{names[self.item]},…"
        return names[self.kind]

    @property
    def default_text(self) -> str:
        value = self.default
        if value is None:
            return "none"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, tuple):
            return ",".join(map(str, value)) or '""'
        return str(value) if value != "" else '""'


def _scalar(kind: type, text: str) -> Any:
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError("expected true or false (1/0, yes/no, on/off)")
    try:
        return kind(text)
    except ValueError:
        expected = {int: "an integer", float: "a number"}[kind]
        raise ValueError(f"expected {expected}") from None


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body), on one line."""
    try:
        (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    except (OSError, TypeError, ValueError):  # no source: no help text, never a crash
        return {}
    assert isinstance(node, ast.ClassDef)
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def settings(sections: tuple[Section, ...] = SECTIONS) -> tuple[Setting, ...]:
    """Every configurable field of WorkerConfig (or of another root, e.g. GATEWAY_SECTIONS) and
    its sections, in documentation order."""
    found = []
    for section in sections:
        hints = get_type_hints(section.cls)
        docs = field_docs(section.cls)
        for f in dataclasses.fields(section.cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue  # a section of its own
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            found.append(Setting(
                section=section.attr,
                name=f.name,
                hint=hints[f.name],
                default=default,
                help=docs.get(f.name, ""),
                env=f.metadata.get("env", section.env_prefix + f.name.upper()),
                flag=f.metadata.get("flag", section.flag_prefix + f.name.replace("_", "-")),
                aliases=tuple(f.metadata.get("aliases", ())),
                secret=not f.repr,
            ))
    for s in found:
        if s.item not in (int, float, str, bool) or (s.kind is tuple and s.item is bool):
            raise TypeError(f"setting {s.name}: {s.hint} has no text form; use int, float, str, "
                            "bool, a tuple of int/float/str, or one of those | None")
    for what, names in (("name", [s.name for s in found]), ("variable", [s.env for s in found]),
                        ("flag", [f for s in found for f in (s.flag, *s.aliases) if f])):
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise RuntimeError(f"settings share a {what}: {twice}")
    return tuple(found)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a YAML file of `setting_name: value` lines (the names of
    docs/configuration.md without the leading dashes, with `_`: `max_num_seqs: 128`). Unknown
    names and unreadable values are named in one ValueError."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of setting names to values")
    known = {s.name: s for s in settings()}
    # A key is a setting's name or its flag without the dashes (`cache` for --cache,
    # `cache_l1_bytes` for --cache-l1-bytes): what docs/configuration.md lists, `-` as `_`.
    for setting in settings():
        for flag in (setting.flag, *setting.aliases):
            if flag:
                known.setdefault(flag.lstrip("-").replace("-", "_"), setting)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ValueError(f"config file {path}: unknown settings {unknown}")
    if env_only := sorted(k for k in data if known[k].flag is None):
        raise ValueError(f"config file {path}: {env_only} may only come from the environment")
    data = {known[k].name: v for k, v in data.items()}
    # Values as text, so a file goes through the same parser as flags and variables.
    return {k: (",".join(map(str, v)) if isinstance(v, list | tuple) else str(v).lower()
                if isinstance(v, bool) else "none" if v is None else str(v))
            for k, v in data.items()}


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    section: str | None = None,
    file: Mapping[str, str] | None = None,
    sections: tuple[Section, ...] = SECTIONS,
) -> dict[str, tuple[Any, str]]:
    """The settings given by a flag or, failing that, a variable or, failing that, the config
    file: name -> (value, source).

    `flags` maps setting names (argparse dests) to text, or to typed values used as they are;
    None means not given. `env` defaults to os.environ. `file` is `read_config_file`'s result.
    Every unreadable value is named in one ValueError.
    """
    flags = flags or {}
    env = os.environ if env is None else env
    file = file or {}
    given: dict[str, tuple[Any, str]] = {}
    errors = []
    for s in settings(sections):
        if section is not None and s.section != section:
            continue
        raw, source = flags.get(s.name), s.flag or s.name
        if raw is None:
            raw, source = env.get(s.env), s.env
        if raw is None:
            raw, source = file.get(s.name), f"config file: {s.name}"
        if raw is None:
            continue
        if not isinstance(raw, str):
            given[s.name] = (raw, source)
            continue
        try:
            given[s.name] = (s.parse(raw), source)
        except ValueError as exc:
            errors.append(f"{source}={raw!r}: {exc}")
    if errors:
        raise ValueError("; ".join(errors))
    return given


def load_worker_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    validate: bool = True,
    file: Mapping[str, str] | None = None,
) -> WorkerConfig:
    """A WorkerConfig from flags, then environment variables, then the config file, then
    defaults; validated unless `validate` is false. ValueError names every unreadable or invalid
    value."""
    parts: dict[str, dict[str, Any]] = {section.attr: {} for section in SECTIONS}
    by_name = {s.name: s for s in settings()}
    for name, (value, _) in resolve_settings(flags, env, file=file).items():
        parts[by_name[name].section][name] = value
    sections = {s.attr: s.cls(**parts[s.attr]) for s in SECTIONS if s.attr}
    config = WorkerConfig(**sections, **parts[""])
    if validate:
        config.validate()
    return config


def load_gateway_config(
    flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """A validated GatewayConfig from flags, then environment variables, then defaults."""
    parts: dict[str, dict[str, Any]] = {section.attr: {} for section in GATEWAY_SECTIONS}
    by_name = {s.name: s for s in settings(GATEWAY_SECTIONS)}
    for name, (value, _) in resolve_settings(flags, env, sections=GATEWAY_SECTIONS).items():
        parts[by_name[name].section][name] = value
    config = GatewayConfig(kafka=KafkaSettings(**parts["kafka"]), **parts[""])
    config.validate()
    return config


def settings_markdown() -> str:
    """docs/configuration.md: one table per section, every setting with its flag and variable."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `streamer config --markdown` from the docstrings in streamer/config.py",
        "     and streamer/validation.py; tests/test_config.py checks it is current. -->",
        "",
        "Every setting of `streamer worker` (and of each worker `streamer fleet` starts) comes",
        "from its flag, else its environment variable, else the default. Booleans take",
        "`--x` / `--no-x` on the command line and `1/0`, `true/false`, `yes/no`, `on/off` in the",
        "environment; lists are comma separated; `none` (or an empty value) unsets an optional",
        "number or list. `streamer config [flags]` prints the settings a worker would use, and",
        "where each came from.",
    ]
    for section in SECTIONS:
        intro = " ".join((section.cls.__doc__ or "").split())
        lines += ["", f"## {section.title}", "", intro, "",
                  "| Flag | Environment | Default | Description |", "|---|---|---|---|"]
        for s in settings():
            if s.section != section.attr:
                continue
            flags = [s.flag, *s.aliases] if s.flag else []
            if s.off_flag:
                flags = [f"{s.flag} / {s.off_flag}", *s.aliases]
            flag = ", ".join(f"`{f}`" for f in flags) or "–"
            cells = [flag, f"`{s.env}`", f"`{s.default_text}`", s.help]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    gateway = GATEWAY_SECTIONS[0]
    lines += ["", "## Gateway", "", " ".join((gateway.cls.__doc__ or "").split())
              + " Kafka settings are the worker's (above).", "",
              "| Flag | Environment | Default | Description |", "|---|---|---|---|"]
    for s in settings(GATEWAY_SECTIONS):
        if s.section == gateway.attr:
            flag = ", ".join(f"`{f}`" for f in (s.flag, *s.aliases) if f) or "–"
            cells = [flag, f"`{s.env}`", f"`{s.default_text}`", s.help]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
