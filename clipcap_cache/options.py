"""One definition of every option: its default, type, choices and help, beside its config field.

A config dataclass declares each of its fields with `option()`:

    @dataclass
    class ServeConfig:
        checkpoint: str = option(help="Checkpoint folder or run directory.")
        port: int = option(8000, help="TCP port.")
        device: str = DEVICE.field()  # a definition shared by several configs (devices.py)

`option()` is a `dataclasses.field` that keeps an `Option` in its metadata. The command line
(`cli.py`) builds every command's Typer parameters from those fields (`options_of`) and the config
from the parsed values (`build`), so the default, the type, the choice list and the help text that
`clipcap COMMAND --help` shows are the config's own and are written nowhere else. A config checks
its choices in `__post_init__` with `check_choices`, from the same tuples.

How a field becomes an option:

- The flag is the field's name in kebab case: `batch_size` is `--batch-size`. A bool that
  defaults to False is a switch (`--strict`); one that defaults to True comes with its negation
  (`--bertscore/--no-bertscore`). `flags=` spells it otherwise (`validate` is `--val/--no-val`).
- A field without a default is a required option, or with `argument=True` a positional argument.
- A field with a `default_factory` is optional on the command line: left out, the factory runs.
  `cli_default=` gives a default to the command line alone (a field Python callers must give).
- `cli=False` keeps a field off the command line (one that comes from the cache, say).

Adding a field is one line in its config class, for example

    group_by_length: bool = option(False, help="Batch captions of similar length together.")

and every command built from that config takes `--group-by-length` and lists it in `--help`;
nothing else changes. Add its range check to `__post_init__` if it has one, and its line to the
README: `tests/test_options.py` checks that the README's defaults are the configs'.
"""

import dataclasses
import typing
from dataclasses import MISSING
from typing import Any

from clipcap_cache.checks import one_of

METADATA_KEY = "clipcap_option"


class _Unset:
    """The value of an `Option` attribute not given (dataclasses' MISSING cannot be a default)."""

    def __repr__(self):
        return "UNSET"


UNSET = _Unset()


def _or_missing(value):
    return MISSING if value is UNSET else value


def _or_unset(value):
    return UNSET if value is MISSING else value


@dataclasses.dataclass(frozen=True)
class Option:
    """How one setting appears to its users; `field()` puts it on a config dataclass.

    Attributes:
        default: the value when the option is not given (UNSET: required).
        help: one line for `--help`.
        choices: the allowed values; `--help` lists them and `check_choices` enforces them.
        flags: the command line's spelling, such as `("--val/--no-val",)`; default: the name.
        argument: a positional argument rather than an option.
        metavar: the name `--help` shows for the value, or for an argument.
        default_text: what `--help` says about a default that is computed (None, a factory).
        default_factory: makes the default when the option is not given.
        cli: whether the command line offers it at all.
        cli_type: the type the command line parses into, when not the field's own.
        cli_default: the command line's default for a field that Python callers must give.

    """

    default: Any = UNSET
    help: str = ""
    choices: tuple | None = None
    flags: tuple[str, ...] = ()
    argument: bool = False
    metavar: str | None = None
    default_text: str | None = None
    default_factory: Any = UNSET
    cli: bool = True
    cli_type: Any = None
    cli_default: Any = UNSET

    def field(self, **changes) -> Any:
        """A new dataclass field with this option (with `changes`) in its metadata."""
        spec = dataclasses.replace(self, **changes)
        return dataclasses.field(
            default=_or_missing(spec.default),
            default_factory=_or_missing(spec.default_factory),
            metadata={METADATA_KEY: spec},
        )

    def help_text(self) -> str:
        """The help line with the choices appended."""
        if not self.choices:
            return self.help
        return f"{self.help} ({' | '.join(self.choices)})".strip()


def option(default: Any = UNSET, *, help: str = "", **settings) -> Any:
    """A config field and its command-line option, such as `option(8000, help="TCP port.")`.

    `settings` are `Option`'s other attributes (`choices`, `flags`, `argument`, ...).
    """
    return Option(default, help, **settings).field()


@dataclasses.dataclass(frozen=True)
class NamedOption:
    """A field's option with what the field adds: its name and type."""

    name: str
    annotation: Any
    spec: Option

    @property
    def default(self) -> Any:
        """The command line's default: MISSING if required, None if a factory makes it."""
        if self.spec.cli_default is not UNSET:
            return self.spec.cli_default
        if self.spec.default_factory is not UNSET:
            return None
        return _or_missing(self.spec.default)

    @property
    def flags(self) -> tuple[str, ...]:
        if self.spec.flags:
            return self.spec.flags
        flag = "--" + self.name.replace("_", "-")
        if self.annotation is bool and self.spec.default is True:
            return (f"{flag}/--no-{flag[2:]}",)
        return (flag,)


def spec_of(field: dataclasses.Field) -> Option:
    """The `Option` of a dataclass field; a field declared without `option()` gets a bare one."""
    spec = field.metadata.get(METADATA_KEY)
    if spec is None:
        spec = Option(_or_unset(field.default), default_factory=_or_unset(field.default_factory))
    return spec


def options_of(config_class, exclude=()) -> list[NamedOption]:
    """The command-line options of a config class, in field order, less `exclude` and `cli=False`."""
    hints = typing.get_type_hints(config_class)
    found = []
    for field in dataclasses.fields(config_class):
        spec = spec_of(field)
        if spec.cli and field.name not in exclude:
            found.append(NamedOption(field.name, hints[field.name], spec))
    return found


def build(config_class, values: dict):
    """The config from parsed option values: fields not in `values` keep their defaults.

    A None for a field whose default comes from a factory means "not given": the factory runs.
    """
    kwargs = {}
    for field in dataclasses.fields(config_class):
        if field.name not in values:
            continue
        value = values[field.name]
        if value is None and field.default_factory is not MISSING:
            continue
        kwargs[field.name] = value
    return config_class(**kwargs)


def check_choices(config) -> None:
    """Refuse any field of `config` whose value is not one of its option's choices."""
    for field in dataclasses.fields(config):
        spec = spec_of(field)
        if spec.choices and getattr(config, field.name) is not None:
            one_of(config, field.name, spec.choices)


def defaults(config_class) -> dict:
    """Each field's default (the factory's value for a factory field); required fields left out."""
    found = {}
    for field in dataclasses.fields(config_class):
        if field.default is not MISSING:
            found[field.name] = field.default
        elif field.default_factory is not MISSING:
            found[field.name] = field.default_factory()
    return found
