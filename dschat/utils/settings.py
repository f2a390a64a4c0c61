"""Settings as typed data: frozen dataclasses whose fields are the flags.

A flag group (data, optimisation, DeepSpeed, LoRA, ...) is a frozen dataclass; each field is one flag and
carries its help, aliases, choices and `nargs` in its metadata (`flag(...)`), as TRL's configs do. A
stage's settings type inherits the groups it offers, flat (`SFTSettings(DataSettings, ModelSettings, ...)`),
so a field's name is its flag's destination and code reads `settings.learning_rate` as it read
`args.learning_rate`. From that one definition come:

- `build_parser()`: the argparse parser (every flag, alias, default, `nargs`, `--x/--no_x` pair and help);
- `parse_args(argv)`: the frozen, checked settings of a command line;
- `from_mapping({"zero_stage": 3, ...})`: the same settings from flag values held as data (a pipeline
  stage section), refusing an unknown key with a "did you mean" suggestion;
- `record()` and `group_values(title)`: what a run records, derived from the fields.

Checks run at construction: every class of a settings type may define `_check(self)`, called base first
(a group checks its own flags, a stage its cross-flag rules), raising `UserError` naming the flag. Values
derived from the flags (the resolved dtype, a default that depends on another flag) are properties;
nothing writes into a settings object after it is built. Standard library and `dschat.utils.errors` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import math
import os
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from dschat.utils.errors import UserError

# Ends a help text that states its own default: ArgumentDefaultsHelpFormatter then appends no
# "(default: None)" (it skips helps that mention %(default); this one renders as nothing).
OWN_DEFAULT = "%(default).0s"

S = TypeVar("S", bound="Settings")


def finite_float(text: str) -> float:
    """A float flag's value; nan and inf are refused (a nan threshold or learning rate would run
    and silently produce garbage)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class FlagParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2 (argparse's own code), and reads
    every `type=float` flag as a finite float."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)

    def flag_names(self) -> frozenset[str]:
        """The flags this parser takes, without dashes: what a pipeline config section may set for the step.
        Leaves out what has no default of its own (--help, deprecated aliases, the `--no_x` of a switch)."""
        return frozenset(option.lstrip("-") for option, action in self._option_string_actions.items()
                         if option.startswith("--") and action.default is not argparse.SUPPRESS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the description and epilog printed as written (the epilog's table)."""


def new_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with the project's conventions (for tools whose flags are not settings, e.g. rw_eval.py)."""
    return FlagParser(description=description, epilog=epilog, formatter_class=HelpFormatter)


class DeprecatedAlias(argparse.Action):
    """An old flag name that still works, with a one-line notice naming its replacement."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


# --------------------------------------------------------------------------------------------- parity profile

# The flag that switches on DeepSpeed-Chat's defaults: every group of a settings type may declare, in
# `upstream_defaults`, the flags whose upstream default differs from ours (with why ours differs); with
# --dschat_compat those values become the defaults when the settings are built (parse_args, from_mapping),
# so any flag given explicitly still wins and nothing is changed after construction.
PARITY_FLAG = "dschat_compat"


@dataclasses.dataclass(frozen=True)
class UpstreamDefault:
    """A flag's DeepSpeed-Chat default where ours differs, and why ours differs (--help's epilog, README)."""

    value: Any
    why: str
    ours: str | None = None  # how our default reads when the field's default (None) stands for a rule


# --------------------------------------------------------------------------------------------- fields


def flag(default: Any = dataclasses.MISSING, help: str = "", *, aliases: Sequence[str] = (),  # noqa: A002
         deprecated: Sequence[str] = (), choices: Sequence[Any] | None = None, nargs: str | None = None,
         negative: str | None = None, negative_help: str | None = None, own_default: bool = False,
         hidden: bool = False, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False, when: str | None = None) -> Any:
    """A settings field that is a flag. `default` omitted: a required flag. `aliases`: more option strings
    for the same setting; `deprecated`: old names that still work with a warning; `negative`: the option
    that sets a boolean to False (`--no_x`; `negative_help` None hides it from --help); `own_default`: the
    help states its default itself; `low`/`high` (`low_open`, `high_open`): the accepted range, checked at
    construction (and by option parsers that check ranges as they parse, click) unless `when` names a boolean
    field that is False (a sampling temperature matters only when sampling)."""
    metadata = {"help": help, "aliases": tuple(aliases), "deprecated": tuple(deprecated),
                "choices": tuple(choices) if choices is not None else None, "nargs": nargs, "negative": negative,
                "negative_help": negative_help, "own_default": own_default, "hidden": hidden,
                "low": low, "high": high, "low_open": low_open, "high_open": high_open, "when": when}
    if isinstance(default, list):
        values = list(default)
        return dataclasses.field(default_factory=lambda: list(values), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same_flag(owner: type[Settings], name: str, **changes: Any) -> Any:
    """The field `name` of the settings type `owner` again, with `changes` (a new default, help, ...):
    one definition of a flag, re-declared where a stage offers it with another default."""
    base = {f.name: f for f in dataclasses.fields(owner)}[name]
    metadata = dict(base.metadata)
    default = changes.pop("default", dataclasses.MISSING)
    if default is dataclasses.MISSING:
        default = base.default if base.default is not dataclasses.MISSING else (
            base.default_factory() if base.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
    unknown = set(changes) - set(metadata)
    if unknown:
        raise TypeError(f"same_flag: unknown flag options {sorted(unknown)}")
    metadata.update({k: tuple(v) if k in ("aliases", "deprecated") else v for k, v in changes.items()})
    help_text = metadata.pop("help")
    return flag(default, help_text, **metadata)


def _unwrap(hint: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field annotation such as `int`, `str | None` or `list[str]`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return _unwrap(members[0])
    if origin in (list, tuple, Sequence):
        return typing.get_args(hint)[0], True
    return hint, False


def _number_text(value: float | None) -> str | None:
    """A range bound as text: an int in full (a seed's 4294967295), a float short (0.5, 1e-08)."""
    if value is None:
        return None
    return str(value) if isinstance(value, int) else f"{value:g}"


def _converter(kind: type):
    return finite_float if kind is float else kind


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One field seen as a flag: its names, type and group."""

    field: dataclasses.Field
    kind: type
    is_list: bool
    group: str
    group_description: str | None

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata

    @property
    def option(self) -> str:
        return f"--{self.name}"

    @property
    def names(self) -> tuple[str, ...]:
        """Every option string that sets this field (aliases, deprecated names and the negative one too)."""
        extra = (self.meta["negative"],) if self.meta["negative"] else ()
        return (self.option, *self.meta["aliases"], *self.meta["deprecated"], *extra)

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING and self.field.default_factory is dataclasses.MISSING

    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return None if self.required else self.field.default

    def help(self) -> str:
        return self.meta["help"] + (OWN_DEFAULT if self.meta["own_default"] else "")

    def add_to(self, group) -> None:
        """The argparse option(s) of this field."""
        meta = self.meta
        names = (self.option, *meta["aliases"])
        help_text = argparse.SUPPRESS if meta["hidden"] else self.help()
        if self.kind is bool and not self.is_list:
            group.add_argument(*names, dest=self.name, action="store_true", default=self.default(), help=help_text)
            if meta["negative"]:
                group.add_argument(meta["negative"], dest=self.name, action="store_false", default=argparse.SUPPRESS,
                                   help=meta["negative_help"] or argparse.SUPPRESS)
            return
        options = {"dest": self.name, "type": _converter(self.kind), "help": help_text}
        if meta["choices"] is not None:
            options["choices"] = meta["choices"]
        if meta["nargs"] or self.is_list:
            options["nargs"] = meta["nargs"] or "*"
        if self.required:
            options["required"] = True
        else:
            options["default"] = self.default()
        group.add_argument(*names, **options)
        for old in meta["deprecated"]:
            group.add_argument(old, dest=self.name, type=_converter(self.kind), action=DeprecatedAlias,
                               replacement=self.option, default=argparse.SUPPRESS,
                               help=f"Deprecated alias of {self.option}.")

    def range_text(self) -> str | None:
        """The accepted values as text (">= 0", "in (0, 1]"), None when the flag has no range."""
        low, high, meta = _number_text(self.meta["low"]), _number_text(self.meta["high"]), self.meta
        if low is None and high is None:
            return None
        if high is None:
            return f"{'>' if meta['low_open'] else '>='} {low}"
        if low is None:
            return f"{'<' if meta['high_open'] else '<='} {high}"
        return f"in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"

    def in_range(self, value: Any) -> bool:
        low, high, meta = self.meta["low"], self.meta["high"], self.meta
        above = low is None or (value > low if meta["low_open"] else value >= low)
        below = high is None or (value < high if meta["high_open"] else value <= high)
        return above and below  # nan fails every comparison

    def check_range(self, settings: Settings) -> None:
        value = getattr(settings, self.name)
        if value is None or self.range_text() is None or (self.meta["when"] and not getattr(settings, self.meta["when"])):
            return
        if not self.in_range(value):
            raise UserError(f"--{self.name} {value}: must be {self.range_text()}")

    def coerce(self, value: Any, where: str) -> Any:
        """A mapping's value as the flag would have parsed it (the types YAML gives, or their text)."""
        key = f"{where}{self.name}"
        if self.kind is bool and not self.is_list:
            if not isinstance(value, bool):
                raise UserError(f"{key}: {value!r} is not true or false")
            return value
        if self.is_list:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            return [self._one(v, key) for v in values]
        return self._one(value, key)

    def _one(self, value: Any, key: str) -> Any:
        if isinstance(value, bool) or isinstance(value, (dict, list, tuple)):
            raise UserError(f"{key}: {value!r} is not a {self.kind.__name__}")
        try:
            converted = _converter(self.kind)(value if self.kind is str else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise UserError(f"{key}: {value!r} is not a {'finite ' if self.kind is float else ''}"
                            f"{self.kind.__name__}") from err
        choices = self.meta["choices"]
        if choices is not None and converted not in choices:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return converted


# --------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of every flag group and stage settings type (frozen: assigning a field raises).

    Class attributes: `flag_group` (the --help section of the fields a class declares) and
    `flag_group_description`; a stage type sets `description` (its --help header)."""

    flag_group: typing.ClassVar[str | None] = None
    flag_group_description: typing.ClassVar[str | None] = None
    description: typing.ClassVar[str] = ""
    # {flag: UpstreamDefault} for the flags this class declares or re-declares whose DeepSpeed-Chat default
    # differs from ours (see PARITY_FLAG)
    upstream_defaults: typing.ClassVar[Mapping[str, UpstreamDefault]] = {}

    def __post_init__(self) -> None:
        for spec in self.flag_specs():
            spec.check_range(self)
        for klass in reversed(type(self).__mro__):
            check = klass.__dict__.get("_check")
            if check is not None:
                check(self)

    # ---- the flags
    @classmethod
    def flag_specs(cls) -> tuple[FlagSpec, ...]:
        """Every field as a flag, in definition order (a field keeps the group of the class that declared it
        first, also where a stage re-declares it with another default)."""
        cached = cls.__dict__.get("_flag_specs")
        if cached is not None:
            return cached
        hints = typing.get_type_hints(cls)
        order = _reading_order(cls)
        specs = []
        for f in dataclasses.fields(cls):
            owner = next(k for k in order if f.name in k.__dict__.get("__annotations__", {}))
            kind, is_list = _unwrap(hints[f.name])
            position = (order.index(owner), list(owner.__dict__["__annotations__"]).index(f.name))
            specs.append((position, FlagSpec(f, kind, is_list, owner.__dict__.get("flag_group") or "options",
                                             owner.__dict__.get("flag_group_description"))))
        specs = tuple(spec for _, spec in sorted(specs, key=lambda item: item[0]))
        type.__setattr__(cls, "_flag_specs", specs)
        return specs

    @classmethod
    def build_parser(cls) -> argparse.ArgumentParser:
        """The command line of this settings type: one option per field (plus its aliases), in --help
        sections by flag group."""
        parser = new_parser(cls.description or (cls.__doc__ or "").strip().splitlines()[0], cls.upstream_epilog())
        groups: dict[str, Any] = {}
        for spec in cls.flag_specs():
            if spec.group not in groups:
                groups[spec.group] = parser.add_argument_group(spec.group, spec.group_description)
            spec.add_to(groups[spec.group])
        return parser

    @classmethod
    def parse_args(cls: type[S], argv: Sequence[str] | None = None) -> S:
        """The checked settings of a command line (`sys.argv[1:]` when None); a bad flag is one line and exit
        code 2 (argparse), a bad value a `UserError` naming the flag."""
        parser = cls.build_parser()
        namespace = parser.parse_args(argv)
        profile = cls.profile_defaults(vars(namespace))
        if profile:  # --dschat_compat: upstream's defaults, then the command line again over them
            parser.set_defaults(**profile)
            namespace = parser.parse_args(argv)
        return cls(**vars(namespace))

    # ---- DeepSpeed-Chat's defaults (PARITY_FLAG)
    @classmethod
    def upstream_values(cls) -> dict[str, UpstreamDefault]:
        """Every flag of this type whose DeepSpeed-Chat default differs from ours, in flag order (the
        `upstream_defaults` of its classes; a stage's own entry wins over its groups')."""
        names = [spec.name for spec in cls.flag_specs()]
        found: dict[str, UpstreamDefault] = {}
        for klass in reversed(cls.__mro__):
            found.update({k: v for k, v in klass.__dict__.get("upstream_defaults", {}).items() if k in names})
        return {name: found[name] for name in names if name in found}

    @classmethod
    def profile_defaults(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults that the flag values `given` switch on: upstream's (`upstream_values`) when
        --dschat_compat is among them, else none."""
        if not given.get(PARITY_FLAG):
            return {}
        return {name: default.value for name, default in cls.upstream_values().items()}

    @classmethod
    def upstream_epilog(cls) -> str | None:
        """--help's table of the defaults that differ from DeepSpeed-Chat's (None for a type without the
        parity flag)."""
        if PARITY_FLAG not in {spec.name for spec in cls.flag_specs()} or not cls.upstream_values():
            return None
        defaults = {spec.name: spec.default() for spec in cls.flag_specs()}
        lines = [f"defaults that differ from DeepSpeed-Chat's (--{PARITY_FLAG} sets them all as upstream; a flag "
                 "given explicitly still wins):"]
        for name, upstream in cls.upstream_values().items():
            ours = upstream.ours or _shown(defaults[name])
            lines.append(f"  --{name}: {ours} (DeepSpeed-Chat: {_shown(upstream.value)})")
            lines += textwrap.wrap(upstream.why, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        return "\n".join(lines)

    @classmethod
    def option_index(cls) -> dict[str, str]:
        """{option name without dashes: field name}, aliases and deprecated names included."""
        return {name.lstrip("-"): spec.name for spec in cls.flag_specs() for name in spec.names
                if not (spec.meta["negative"] and name == spec.meta["negative"])}

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, Any], *, where: str = "") -> S:
        """The checked settings from flag values held as data (`{"zero_stage": 3, "offload": True}`): keys
        are flag names without dashes (aliases too), values what YAML gives (a list for a multi-value flag,
        true/false for a switch); None leaves a setting at its default. An unknown key, a value of the wrong
        type or outside the flag's choices is a `UserError` naming `where` + the key (with a suggestion for a
        misspelled key)."""
        index = cls.option_index()
        specs = {spec.name: spec for spec in cls.flag_specs()}
        chosen: dict[str, Any] = {}
        for key, value in values.items():
            name = index.get(str(key).lstrip("-")) if isinstance(key, str) else None
            if name is None:
                close = difflib.get_close_matches(str(key), list(index), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else "; see the stage's --help for its settings"
                raise UserError(f"{where}{key}: not a setting of {cls.__name__}{hint}")
            if name in chosen:
                raise UserError(f"{where}{key}: {name} is given twice (under two of its names); keep one")
            if value is not None:
                chosen[name] = specs[name].coerce(value, where)
        chosen = {**cls.profile_defaults(chosen), **chosen}
        missing = [spec.name for spec in specs.values() if spec.required and spec.name not in chosen]
        if missing:
            raise UserError(f"{where}{missing[0]}: required (the --{missing[0]} flag)")
        return cls(**chosen)

    @classmethod
    def adopt(cls: type[S], args: Any) -> S:
        """`args` itself when it already is settings of this type; else the settings of an argparse Namespace
        made by another parser (DeepSpeed-Chat's step mains pass theirs to `DeepSpeedRLHFEngine` and
        `DeepSpeedPPOTrainer`): its attributes that are flags of this type are taken through `from_mapping`
        (checked alike), the others (`global_rank`, ...) are not flags and are left out; None keeps a default;
        an enum (transformers' `SchedulerType`) counts as its value."""
        if isinstance(args, cls):
            return args
        names = {spec.name for spec in cls.flag_specs()}
        return cls.from_mapping({k: v.value if isinstance(v, enum.Enum) else v for k, v in vars(args).items()
                                 if k in names}, where="args.")

    # ---- what a run records
    def flag_values(self) -> dict[str, Any]:
        """Every flag's value as given (lists copied)."""
        return {spec.name: _plain(getattr(self, spec.name)) for spec in self.flag_specs()}

    def derived(self) -> dict[str, Any]:
        """Values the run used that are derived from the flags, under the flag's name (e.g. the resolved
        `dtype`); a group overrides it and calls super()."""
        return {}

    def record(self) -> dict[str, Any]:
        """What a run records of its settings: every flag, derived values in place of their flag's raw one."""
        return {**self.flag_values(), **self.derived()}

    @classmethod
    def group_names(cls, title: str) -> tuple[str, ...]:
        """The fields of the flag group `title`, in definition order."""
        names = tuple(spec.name for spec in cls.flag_specs() if spec.group == title)
        if not names:
            raise KeyError(f"{cls.__name__} has no flag group {title!r}")
        return names

    def group_values(self, title: str) -> dict[str, Any]:
        """{field: value} of one flag group: a record derived from the group, so a new flag in it is recorded
        without a list to edit."""
        return {name: _plain(getattr(self, name)) for name in self.group_names(title)}


def _reading_order(cls: type) -> list[type]:
    """The classes of a settings type as its definition reads: each base before the class that extends it,
    bases in the order they are listed (dataclasses order fields the other way round, by the MRO)."""
    order: list[type] = []

    def visit(klass: type) -> None:
        if klass in order or klass is object:
            return
        for base in klass.__bases__:
            visit(base)
        order.append(klass)

    visit(cls)
    return order


def _shown(value: Any) -> str:
    """A default as a user types it on the command line (None: the flag's own rule, said in its help)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_positive(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} {value}: must be positive")
