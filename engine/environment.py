"""Settings from the environment: one loop over a configuration dataclass's fields.

Each configuration dataclass (``EngineConfig``, ``ApiConfig`` and the ones nested in them: ``Quotas``,
``VerificationPolicy``, ``KmsSettings``, ``RateLimits``) declares a :class:`Section` as its ``ENV`` class
variable: the prefix its variables share and what differs from the rule. :func:`variables` walks the fields
and derives one variable per field, ``<prefix><FIELD>`` in upper case (``workers`` -> ``ENGINE_WORKERS``),
unless the section names it otherwise (the documented names that predate the rule, such as ``DATABASE_URL``
or ``ENGINE_QUOTA_VERIFY_PER_HOUR``); a field whose type is itself a configuration dataclass contributes
its own section's variables. :func:`build` reads them and converts each value by the field's type:

    bool                      1/0, true/false, yes/no, on/off (any case); anything else is an error
    int, float                a number (finite), within the field's :class:`Bound` (default: >= 0)
    str, Path                 the text (a field with choices: one of them, any case)
    an Enum                   a member's name or value, any case (``binance`` -> ``Venue.BINANCE``)
    tuple[X, ...]             comma-separated values of X (blanks between them ignored)
    Mapping[K, V]             ``k=v,k2=v2``, keys and values converted as K and V
    IPv4Network | IPv6Network an address or CIDR network (a bare address is a /32 or /128)
    X | None                  as X (an unset variable keeps the field's default)

An empty variable is the same as an unset one. A secret field (the DSNs, the JWT secret) may instead be
given as ``<VAR>_FILE``, the name of a file holding it (Docker and Kubernetes secrets): its content, a
trailing newline stripped (symlinks followed; a pipe or a device is refused at once rather than waited on); both
set, an unreadable, empty or oversized file is an error naming the variable but never quoting its text.
Every error is an :class:`errors.ConfigurationError` whose ``field`` is the variable and whose message says
what is wrong; no message quotes a value (a value may be a secret, or pasted in the wrong variable).

The values are read from :func:`settings_view` of the environment: only the engine's own variables, secret
ones held as :class:`~engine.sensitive.SecretText`, so a traceback rendered with frame locals while the
configuration is built shows no secret.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import ipaddress
import math
import os
import stat
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine import errors
from engine.sensitive import MasterKeysText, SecretDsn, SecretText

__all__ = [
    "FILE_SUFFIX",
    "NON_NEGATIVE",
    "POSITIVE",
    "Bound",
    "Section",
    "Variable",
    "build",
    "build_kwargs",
    "construct",
    "parse_bool",
    "read",
    "read_regular_file",
    "setting",
    "settings_view",
    "variables",
]

T = TypeVar("T")

FILE_SUFFIX = "_FILE"
MAX_SECRET_FILE_BYTES = 64 * 1024  # a DSN or a token secret is a few hundred bytes
TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})

# variables whose values are secret, and how they are masked (anything else with a secret-looking name: ***)
SECRET_VARIABLES: dict[str, type[SecretText]] = {
    "DATABASE_URL": SecretDsn,
    "ENGINE_LISTEN_DATABASE_URL": SecretDsn,
    "ENGINE_MASTER_KEYS": MasterKeysText,
}
# any other variable with one of these in its name is shown as *** (ENGINE_API_JWT_SECRET, PGPASSWORD, ...)
_SECRET_NAME_PARTS = ("SECRET", "PASSWORD", "PASSPHRASE", "TOKEN", "KEY")
_NETWORK = ipaddress.IPv4Network | ipaddress.IPv6Network


def settings_view(env: Mapping[str, str]) -> dict[str, str]:
    """The engine's own variables of ``env`` (``DATABASE_URL``, ``PG*``, ``ENGINE_*``), secret ones masked.

    ``os.environ`` holds every secret of the process; a traceback rendered with frame locals would print all
    of it from any frame that holds it. The ``from_env`` builders read this view instead.
    """
    view: dict[str, str] = {}
    for key, value in env.items():
        if key.startswith(("DATABASE_URL", "ENGINE_", "PG")):
            wrap = _mask_for(key)
            view[key] = wrap(value) if wrap is not None else value
    return view


def _mask_for(variable: str) -> type[SecretText] | None:
    if variable.endswith(FILE_SUFFIX) and variable[: -len(FILE_SUFFIX)] in SECRET_VARIABLES:
        return SecretText  # a file's name, but a secret pasted into it must not show either
    wrap = SECRET_VARIABLES.get(variable)
    if wrap is None and any(part in variable.upper() for part in _SECRET_NAME_PARTS):
        wrap = SecretText
    return wrap


@dataclass(frozen=True, kw_only=True)
class Bound:
    """The numbers a field accepts: ``minimum`` (itself refused when ``exclusive``) to ``maximum``; never NaN
    or an infinity (every wait has a bound)."""

    minimum: float = 0.0
    exclusive: bool = False
    maximum: float = math.inf

    def admits(self, value: float) -> bool:
        """Whether ``value`` is within the bound."""
        if not math.isfinite(value) or value > self.maximum:
            return False
        return value > self.minimum if self.exclusive else value >= self.minimum

    def describe(self) -> str:
        """The rule in words, for messages."""
        low = f"> {self.minimum:g}" if self.exclusive else f">= {self.minimum:g}"
        return low if self.maximum == math.inf else f"{low} and <= {self.maximum:g}"


NON_NEGATIVE = Bound()
POSITIVE = Bound(exclusive=True)


@dataclass(frozen=True, kw_only=True)
class Section:
    """How one configuration dataclass's fields are named and checked in the environment.

    ``prefix``: the variables' common prefix. ``names``: field -> variable where the name is not
    ``prefix + FIELD``. ``bounds``: field -> :class:`Bound` of its numbers (default :data:`NON_NEGATIVE`).
    ``secrets``: fields holding a secret (masked, and also read from ``<VAR>_FILE``), except those in
    ``own_file`` (their file form is a field of its own, e.g. ``ENGINE_MASTER_KEYS_FILE``). ``inverted``:
    bool fields whose variable says the opposite (``reject_withdraw`` <- ``ENGINE_POLICY_ALLOW_WITHDRAW``).
    ``choices``: str fields with a fixed set of values (matched in any case, stored as spelled here).
    ``built_when``: for a section nested as ``X | None``, the fields whose variables make it exist.
    """

    prefix: str
    names: Mapping[str, str] = field(default_factory=dict)
    bounds: Mapping[str, Bound] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()
    own_file: frozenset[str] = frozenset()
    inverted: frozenset[str] = frozenset()
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    built_when: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Variable:
    """One environment variable: the field it sets (``path`` from the outer dataclass) and how."""

    name: str
    path: tuple[str, ...]
    type: Any
    default: Any
    bound: Bound
    secret: bool = False
    file_variable: str | None = None  # <name>_FILE, for a secret
    inverted: bool = False
    choices: tuple[str, ...] = ()


def section_of(cls: type) -> Section:
    """The ``ENV`` section a configuration dataclass declares."""
    section = getattr(cls, "ENV", None)
    if not isinstance(section, Section):
        raise TypeError(f"{cls.__name__} declares no environment Section (ENV)")
    return section


def variable_name(section: Section, name: str) -> str:
    """The variable of field ``name``: the section's own name for it, else ``prefix + NAME``."""
    return section.names.get(name, section.prefix + name.upper())


def _nested(hint: Any) -> tuple[type | None, bool]:
    """(the configuration dataclass ``hint`` is, or None; whether it is optional)."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return None, optional
        hint = args[0]
    if (
        isinstance(hint, type)
        and dataclasses.is_dataclass(hint)
        and isinstance(getattr(hint, "ENV", None), Section)
    ):
        return hint, optional
    return None, optional


def _default(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None


def variables(cls: type, path: tuple[str, ...] = ()) -> tuple[Variable, ...]:
    """Every variable of ``cls`` and of the configuration dataclasses nested in it, in field order."""
    section = section_of(cls)
    hints = typing.get_type_hints(cls)
    found: list[Variable] = []
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        inner, _ = _nested(hint)
        if inner is not None:
            found.extend(variables(inner, (*path, item.name)))
            continue
        name = variable_name(section, item.name)
        secret = item.name in section.secrets
        found.append(
            Variable(
                name=name,
                path=(*path, item.name),
                type=hint,
                default=_default(item),
                bound=section.bounds.get(item.name, NON_NEGATIVE),
                secret=secret,
                file_variable=name + FILE_SUFFIX if secret and item.name not in section.own_file else None,
                inverted=item.name in section.inverted,
                choices=section.choices.get(item.name, ()),
            )
        )
    return tuple(found)


def build(cls: type[T], env: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> T:
    """``cls`` from the variables of ``env`` (a :func:`settings_view`), keyword ``overrides`` winning."""
    return construct(cls, build_kwargs(cls, env), overrides)


def build_kwargs(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that ``env`` sets (nested configuration dataclasses built)."""
    return _kwargs(cls, env, ())


def construct(cls: type[T], kwargs: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> T:
    """``cls(**kwargs, **overrides)``. A value the dataclass itself refuses (its ``__post_init__`` naming a
    field) is reported naming the variable the value came from (not when an override gave it)."""
    given = dict(overrides or {})
    return _construct(cls, {**kwargs, **given}, from_env=set(kwargs) - set(given))


def _kwargs(cls: type, env: Mapping[str, str], path: tuple[str, ...]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    by_field = {v.path[-1]: v for v in variables(cls, path) if len(v.path) == len(path) + 1}
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        inner, optional = _nested(hints[item.name])
        if inner is not None:
            sub = _kwargs(inner, env, (*path, item.name))
            if optional and not any(name in sub for name in section_of(inner).built_when):
                continue
            kwargs[item.name] = _construct(inner, sub, from_env=set(sub))
            continue
        variable = by_field[item.name]
        raw = read(env, variable)
        if raw is not None:
            kwargs[item.name] = convert(raw, variable)
    return kwargs


def _construct(cls: type[T], kwargs: dict[str, Any], *, from_env: set[str]) -> T:
    """``cls(**kwargs)``; its ConfigurationError about a field read from the environment names the variable."""
    section = section_of(cls)
    names = {item.name: variable_name(section, item.name) for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**kwargs)
    except errors.ConfigurationError as exc:
        if exc.field not in from_env or exc.field not in names:
            raise
        variable = names[exc.field]
        raise errors.ConfigurationError(f"{variable}: {exc.message}", field=variable) from None


def read(env: Mapping[str, str], variable: Variable) -> str | None:
    """The variable's text, from itself or (a secret) from the file its ``_FILE`` variable names; None when
    neither is set. A secret comes back as :class:`SecretText`."""
    value = env.get(variable.name) or None
    file_variable = variable.file_variable
    if file_variable is None or not env.get(file_variable):
        return value
    if value is not None:
        raise errors.ConfigurationError(
            f"{variable.name} and {file_variable} are both set: give one of them", field=file_variable
        )
    # the variable's text is never quoted: a secret pasted into the wrong variable would show in the message
    text, reason = _read_secret_file(SecretText(env[file_variable]))
    if text is None:
        raise errors.ConfigurationError(f"{file_variable}: the file it names {reason}", field=file_variable)
    wrap = _mask_for(variable.name) or SecretText
    return wrap(text)


def read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file at ``path`` (symlinks followed). It is opened without
    blocking and checked before it is read, so a named pipe or a device (``/dev/stdin``) is refused at once
    (:class:`OSError` "not a regular file") instead of holding the start until a writer comes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb") as handle:
            fd = -1  # the file object closes it
            return handle.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)


def _read_secret_file(path: SecretText) -> tuple[str | None, str]:
    """(the file's text, trailing newline stripped; or None and why not). The caller raises, so no frame of
    the traceback holds the content. Symlinks are followed (Kubernetes' secret volumes are symlinks), but the
    file must be a regular file (:func:`read_regular_file`)."""
    try:
        data = read_regular_file(path, MAX_SECRET_FILE_BYTES)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or type(exc).__name__})"
    if len(data) > MAX_SECRET_FILE_BYTES:
        return None, f"is larger than {MAX_SECRET_FILE_BYTES} bytes"
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    if not text:
        return None, "is empty"
    return SecretText(text), ""


def parse_bool(value: str, variable: str) -> bool:
    """``1/true/yes/on`` -> True, ``0/false/no/off`` -> False (any case, blanks around ignored); anything
    else is a :class:`errors.ConfigurationError` naming ``variable``. The engine's one boolean parser."""
    word = value.strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise errors.ConfigurationError(
        f"{variable} must be a boolean: 1/0, true/false, yes/no or on/off", field=variable
    )


def convert(raw: str, variable: Variable) -> Any:
    """``raw`` converted by the variable's field type (module docstring); errors name the variable."""
    value = _convert(raw, variable.type, variable)
    if variable.inverted:
        return not value
    return value


def _fail(variable: Variable, reason: str) -> errors.ConfigurationError:
    return errors.ConfigurationError(f"{variable.name} {reason}", field=variable.name)


def _convert(raw: str, hint: Any, variable: Variable) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint == _NETWORK:
        try:
            return ipaddress.ip_network(raw.strip(), strict=False)
        except ValueError:
            raise _fail(variable, "holds addresses or CIDR networks separated by commas") from None
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{variable.name}: no conversion to {hint}")
        return _convert(raw, inner[0], variable)
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{variable.name}: no conversion to {hint}")
        return tuple(_convert(part, args[0], variable) for part in _entries(raw))
    if origin is Mapping or origin is dict:
        result: dict[Any, Any] = {}
        for part in _entries(raw):
            key, sep, text = part.partition("=")
            if not sep or not key.strip():
                raise _fail(variable, "entries look like key=value, separated by commas")
            result[_convert(key.strip(), args[0], variable)] = _convert(text.strip(), args[1], variable)
        return result
    if hint is bool:
        return parse_bool(raw, variable.name)
    if hint is int:
        try:
            number: float = int(raw.strip())
        except ValueError:
            raise _fail(variable, f"must be an integer {variable.bound.describe()}") from None
        return _bounded(number, variable)
    if hint is float:
        try:
            number = float(raw.strip())
        except ValueError:
            number = math.nan
        return _bounded(number, variable)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        word = raw.strip().lower()
        for member in hint:
            if word in (member.name.lower(), str(member.value).lower()):
                return member
        raise _fail(variable, f"names an unknown {hint.__name__}: one of {', '.join(m.name for m in hint)}")
    if hint is Path:
        return Path(raw)
    if hint is str:
        if variable.choices:
            for choice in variable.choices:
                if raw.strip().lower() == choice.lower():
                    return choice
            raise _fail(variable, f"must be one of {', '.join(variable.choices)}")
        return raw
    raise TypeError(f"{variable.name}: no conversion to {hint}")


def _bounded(number: float, variable: Variable) -> Any:
    if not variable.bound.admits(number):
        kind = "an integer" if variable_is_int(variable.type) else "a number"
        raise _fail(variable, f"must be {kind} {variable.bound.describe()}")
    return number


def variable_is_int(hint: Any) -> bool:
    """Whether the numbers of a field of type ``hint`` are integers (``int``, ``int | None``)."""
    return hint is int or int in typing.get_args(hint)


def _entries(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def setting(cls: type, path: tuple[str, ...], env: Mapping[str, str]) -> Any:
    """One field's value from ``env`` (a :func:`settings_view`), converted as :func:`build` would; None when
    its variable (and, for a secret, its ``_FILE`` form) is unset. For code that needs one setting before, or
    without, a whole configuration (the command line's logging, ``credential-engine token``)."""
    for variable in variables(cls):
        if variable.path == path:
            raw = read(env, variable)
            return None if raw is None else convert(raw, variable)
    raise KeyError(f"{cls.__name__} has no field {'.'.join(path)}")
