"""Dataclass configs as the single schema for CLI flags, `--config` files and resolved run configs.

A command declares one dataclass (fields may themselves be dataclasses, one level deep, exposed as
`--group.field`). Precedence: dataclass defaults < `--config file.{yaml,json}` < explicit flags.
Every field's help text lives in `field(metadata={"help": ...})`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from bioaudio.errors import ConfigError

T = TypeVar("T")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage wall) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert_value(tp: Any, value: Any, name: str) -> Any:
    """Convert a CLI string (or a config-file value) to the field's type, or raise ConfigError."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or value is None:
            return None
    origin = get_origin(tp)
    try:
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                raise ConfigError(
                    f"--{name}: {value!r} is not one of {', '.join(map(str, choices))}"
                )
            return value
        if origin in (list, tuple):
            (inner, *rest) = get_args(tp) or (str,)
            if isinstance(value, str):
                items = [v.strip() for v in value.split(",") if v.strip() != ""]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                items = [value]
            out = [convert_value(inner, v, name) for v in items]
            return tuple(out) if origin is tuple else out
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"--{name}: {value!r} is not a boolean")
        if tp is int:
            if isinstance(value, bool):
                raise ConfigError(f"--{name}: {value!r} is not an integer")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ConfigError(f"--{name}: {value!r} is not an integer")
                return int(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
        if tp is dict or get_origin(tp) is dict:
            if isinstance(value, str):
                return json.loads(value)
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        kind = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"--{name}: {value!r} is not a valid {kind}") from e
    return value


def _type_label(tp: Any) -> str:
    tp, _ = _unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    if origin in (list, tuple):
        inner = (get_args(tp) or (str,))[0]
        return f"{getattr(inner, '__name__', 'X').upper()},..."
    return getattr(tp, "__name__", "X").upper()


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """A command's options: `--config FILE` (YAML / JSON of the options; flags override it) and
    one flag per field of the dataclass `cls` (read back with `config_from_args`)."""
    parser.add_argument("--config", help="YAML / JSON file of options (flags override it)")
    add_dataclass_args(parser, cls)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per field of `cls`. Defaults are suppressed so only explicit flags appear."""
    hints = _resolved_hints(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or None) if prefix else parser
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, prefix=f"{prefix}{f.name}.")
            continue
        default = _field_default(f)
        help_text = f.metadata.get("help", "")
        if default is not dataclasses.MISSING:
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        flag = f"--{prefix}{f.name}"
        base, _ = _unwrap_optional(tp)
        if base is bool:
            group.add_argument(
                flag,
                dest=f"{prefix}{f.name}",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                flag,
                dest=f"{prefix}{f.name}",
                default=argparse.SUPPRESS,
                metavar=_type_label(tp),
                help=help_text,
            )


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build `cls` from a (possibly partial, possibly nested) dict; unknown keys are an error."""
    hints = _resolved_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(names))
    if unknown:
        # a key that belongs one level down (e.g. `eat:` under `objectives:`): say where
        homes = [
            f"`{k}` goes under `{n}:`"
            for k in unknown
            for n in names
            if dataclasses.is_dataclass(hints[n])
            and k in {f.name for f in dataclasses.fields(hints[n])}
        ]
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(unknown)} for {cls.__name__}"
            + (f" ({'; '.join(homes)})" if homes else f" (known: {', '.join(sorted(names))})")
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, dict):
                kwargs[name] = from_dict(tp, value, where=f"{where}.{name}")
            elif dataclasses.is_dataclass(value):
                kwargs[name] = value
            else:
                raise ConfigError(f"{where}.{name}: expected a mapping")
        else:
            kwargs[name] = convert_value(tp, value, name)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass (Paths become strings, tuples lists)."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        return v

    return clean(obj)


def is_run_config(data: dict[str, Any]) -> bool:
    """A run directory's config.json (written by a training command), not a file of options."""
    return isinstance(data.get("command"), str) and ("options" in data or "train" in data)


def run_config_options(
    data: dict[str, Any], where: str | Path, command: str | None = None
) -> dict[str, Any]:
    """The options of a run's config.json, to re-run it with the same resolved options: one-line
    errors for a run of another command and for a config without options. The config of one run
    of an experiment (RUN_ROOT/seed_42/config.json) re-runs that run only: its seed (and fold)."""
    written_by = data.get("command")
    if command is not None and written_by != command:
        raise ConfigError(
            f"{where} is the config of a `bioaudio {written_by}` run, not of `bioaudio "
            f"{command}`; run `bioaudio {written_by} ... --config {where}` instead"
        )
    options = data.get("options")
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: this run config holds no options to re-run")
    options = dict(options)
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    if "seeds" in options and isinstance(run.get("seed"), int):
        options["seeds"] = [run["seed"]]
    if run.get("fold") is not None and "test_fold" in options:
        options["test_fold"], options["cv"] = run["fold"], False
    return options


def load_config_file(path: str | Path, command: str | None = None) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (one-line error when it cannot be read).

    A run directory's config.json is accepted too: its options (see `run_config_options`;
    `command` names the command reading it, which must be the one that wrote it)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from e
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml/json parse errors have many types
        raise ConfigError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value")
    fmt = data.get("format")
    if isinstance(fmt, str) and fmt.startswith("bioaudio."):
        raise ConfigError(
            f"config file {p} is the config.json of a {fmt} folder (a model), not options; "
            "pass the folder itself where a model is expected"
        )
    if is_run_config(data):
        return run_config_options(data, p, command)
    return data


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_args(
    cls: type[T],
    ns: argparse.Namespace,
    *,
    skip: tuple[str, ...] = (),
    command: str | None = None,
) -> T:
    """Resolve a config: defaults < `ns.config` file (if any) < explicit flags in `ns`.

    `--config` may be a run directory's config.json written by the same `command` (default:
    `ns.bioaudio_command`, set by the CLI): the run's resolved options."""
    field_names = {f.name for f in dataclasses.fields(cls)}
    data: dict[str, Any] = {}
    config_path = getattr(ns, "config", None)
    if config_path and "config" not in field_names:
        data = load_config_file(config_path, command or getattr(ns, "bioaudio_command", None))
    flat = {
        k: v
        for k, v in vars(ns).items()
        if k.split(".")[0] in field_names and k not in skip and k != "config"
    }
    if "config" in field_names and "config" in vars(ns):
        flat["config"] = ns.config
    return from_dict(cls, _merge(data, _nest(flat)), where="options")
