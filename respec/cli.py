"""What generate.py and train.py share on the command line: one-line errors, checked numbers, and
options generated from config dataclasses.

A config dataclass declares each option once, as a field made by `option(default, help, ...)`;
`add_options` turns the fields into argparse options (`--max-new-tokens`, also spelled
`--max_new_tokens`, plus any aliases such as TRL's `--max_completion_length`) with their help,
choices and types, and `given_options` returns only what the user set, on the command line or in a
`--config FILE` (YAML or JSON, the same names; flags override the file). Knowing what was *given*,
not just the values, is what lets train.py refuse an option that does not apply to the chosen
stage, or one a resumed run cannot change.

An option that does nothing under another option's value declares it (`needs=Needs(...)`), and
`refuse_inert` refuses it when given, in both scripts by the same rule: a user who typed it expects
it to matter. `shared` declares one script's option from the other's field, so that both show one
help text.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end with one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def fail(self, message: str) -> int:
        """Bad input found after parsing: one line on stderr; returns the exit code 2 for main()."""
        print(f"{self.prog}: {message}", file=sys.stderr)
        return 2


class DefaultsFormatter(argparse.HelpFormatter):
    """--help that shows every option's default (an option whose default is none or off says nothing
    more: its help says what leaving it out does)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: {show_default(default)})".strip()  # (show_default escapes argparse's %)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    return [positive_int(t) for t in text.split(",") if t.strip()] or [positive_int(text)]


# ----------------------------------------------------------------------------------------------
# Options declared once, on the config dataclass
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Needs:
    """When an option does anything: `test` of the values of the options `on` (a name, or a tuple of
    names) is true. `reason` says what makes it inert otherwise, naming that option."""

    on: str | tuple[str, ...]
    test: Callable[..., bool]
    reason: str

    def names(self) -> tuple[str, ...]:
        return (self.on,) if isinstance(self.on, str) else tuple(self.on)

    def holds(self, cfg) -> bool:
        if not all(hasattr(cfg, n) for n in self.names()):  # a stage without that option: nothing to depend on
            return True
        return bool(self.test(*(getattr(cfg, n) for n in self.names())))


def option(default, help: str, *, choices=None, aliases: tuple[str, ...] = (), flag: str | None = None,
           shown: str | None = None, needs: Needs | tuple[Needs, ...] = (), parse: Callable | None = None):
    """A config field that is also a command-line option. `flag` renames it (`--reward` for
    `rewards`; for a bool, a switch that sets the opposite of the default, e.g. `--no-progress`);
    `aliases` are other names in underscore form (TRL's), accepted on the command line and in files;
    `shown` is what --help says the default is, where the value itself (None, empty) would not say;
    `needs` what the option is inert without (`refuse_inert`); `parse` turns the text into the value
    where the field's type would check too little (`positive_int`)."""
    meta = {"help": help, "choices": choices, "aliases": aliases, "flag": flag, "shown": shown,
            "needs": (needs,) if isinstance(needs, Needs) else tuple(needs), "parse": parse}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def shared(cls, name: str, default=dataclasses.MISSING, **changes):
    """The option `name` of the config class `cls` for another script: the same help text and choices
    (one declaration, so the two cannot drift), its own default; `changes` replace other settings of
    `option`. Its aliases and needs stay behind: they speak of the other script's options."""
    f = option_fields(cls)[name]
    meta = {**f.metadata, "aliases": (), "needs": (), **changes}
    if default is dataclasses.MISSING:
        default = _default(cls, name)
    return option(default, **meta)


def flag_of(f: dataclasses.Field) -> str:
    """The name an option is shown by: its flag, else its field name as a flag."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def refuse_inert(cfg, given) -> None:
    """Raise ValueError for the first option in `given` (in the order the config declares them) that
    does nothing under the values of `cfg`, in one line naming the option and what makes it inert.
    A value equal to the default counts as given too."""
    for name, f in option_fields(type(cfg)).items():
        if name in given:
            for need in f.metadata.get("needs", ()):
                if not need.holds(cfg):
                    raise ValueError(f"{flag_of(f)} does not apply: {need.reason}")


def _on_off(text: str) -> bool:
    table = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
    if text.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return table[text.lower()]


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def option_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def _kind(f: dataclasses.Field) -> str:
    return str(f.type).split("|")[0].strip()  # "int", "float", "str", "bool", "dict", "list"


def add_options(parser: argparse.ArgumentParser, configs: dict[str, type]) -> dict[str, set[str]]:
    """Add the options of the config classes {stage: class} (a field in several is added once, its
    help naming each stage's default where they differ); returns {stage: its option names}. Every
    option defaults to "not given" (absent from the namespace)."""
    stages = {stage: set(option_fields(cls)) for stage, cls in configs.items()}
    seen: set[str] = set()
    for stage, cls in configs.items():
        group = parser.add_argument_group(f"--stage {stage}") if len(configs) > 1 else parser
        for name, f in option_fields(cls).items():
            if name in seen:
                continue
            seen.add(name)
            defaults = {s: _default(c, name) for s, c in configs.items() if name in stages[s]}
            shown = " / ".join(f"{s}: {show_default(d)}" for s, d in defaults.items()) \
                if len(set(map(repr, defaults.values()))) > 1 else show_default(defaults[stage])
            shown = f.metadata.get("shown") or shown
            others = [s for s in configs if name in stages[s] and s != stage]
            where = f" [also --stage {', '.join(others)}]" if others and len(configs) > 1 else ""
            meta, kind = f.metadata, _kind(f)
            switch = kind == "bool" and meta["flag"]  # (its name would read as the opposite: --progress)
            names = [flag_of(f)]
            names += [n for n in ((() if switch else ("--" + name,)) + tuple("--" + a for a in meta["aliases"]))
                      if n not in names]
            kw = dict(dest=name, default=argparse.SUPPRESS, help=f"{meta['help']} (default: {shown}){where}")
            if switch and defaults[stage] is None:  # auto unless given: alone it turns on, `off` turns it off
                kw.update(nargs="?", const=True, type=_on_off, metavar="on|off")
            elif switch:  # shown as the switch's own state: off unless given
                kw.update(action="store_const", const=not defaults[stage], help=f"{meta['help']} (default: off){where}")
            elif meta.get("parse"):
                kw.update(type=meta["parse"], choices=meta["choices"])
            elif kind == "bool":
                kw.update(type=_on_off, metavar="on|off")
            elif kind == "list":
                kw.update(action="append")
            elif kind == "dict":
                kw.update(type=json_object, metavar="JSON")
            else:
                kw.update(type={"int": int, "float": float}.get(kind, str), choices=meta["choices"])
            group.add_argument(*names, **kw)
    return stages


def show_default(value) -> str:
    """A default as a user would type it: on/off for booleans, none, plain strings and numbers."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == [] or value == {}:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return ("%s" % value).replace("%", "%%")  # argparse formats help texts with %


def _default(cls, name: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def file_arguments(path: Path, configs: dict[str, type], hints: dict[str, str] | None = None,
                   switches: dict[str, str] | None = None) -> list[str]:
    """A YAML or JSON config file as command-line arguments (so the file's values get the same
    checks as flags). Keys: field names or flag names (`rewards` or `reward`, `progress: false` or
    `no_progress: true`), in either spelling, or their aliases; `switches` are the parser's own
    switches a file may set (`eager: true`); `hints` says what to use instead of a known foreign
    name."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    try:
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:  # yaml and json errors: one line
        raise ValueError(f"--config {path}: not valid {'YAML' if Path(path).suffix in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    fields: dict[str, dataclasses.Field] = {}
    for cls in configs.values():
        for name, f in option_fields(cls).items():
            for key in (name, *f.metadata["aliases"]):
                fields.setdefault(key, f)
    by_flag = {f.metadata["flag"][2:].replace("-", "_"): f for f in fields.values() if f.metadata["flag"]}
    argv = []
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key in (switches or {}):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} must be true or false")
            argv += [switches[key]] if value else []
            continue
        f = fields.get(key)
        if f is None and key in by_flag:  # the flag's name: a switch's value says whether it is given
            f = by_flag[key]
            if _kind(f) == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"--config {path}: {key} must be true or false")
                argv += [f.metadata["flag"]] if value else []
                continue
        if f is None:
            hint = (hints or {}).get(str(key).replace("-", "_"))
            raise ValueError(f"--config {path}: unknown option {key!r}" + (f"; {hint}" if hint else ""))
        flag = flag_of(f)
        kind = _kind(f)
        if value is None:
            continue
        if kind == "bool" and f.metadata["flag"]:
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} must be true or false")
            argv += [flag] if value != f.default else []  # the switch sets the opposite of the default
        elif kind == "list":
            for item in value if isinstance(value, list) else [value]:
                argv += [flag, str(item)]
        elif kind == "dict":
            argv += [flag, json.dumps(value)]
        elif kind == "bool":
            argv += [flag, "on" if value is True else "off" if value is False else str(value)]
        else:
            argv += [flag, str(value)]
    return argv


def given_options(parser: argparse.ArgumentParser, argv: list[str], configs: dict[str, type],
                  hints: dict[str, str] | None = None, switches: dict[str, str] | None = None):
    """(namespace, {option: value} given on the command line or in its --config file; the command
    line wins). Raises ValueError for a bad file."""
    ns = parser.parse_args(argv)
    names = set().union(*(option_fields(c) for c in configs.values()))
    given = {k: v for k, v in vars(ns).items() if k in names}
    if getattr(ns, "config", None) is not None:
        from_file = parser.parse_args(file_arguments(ns.config, configs, hints, switches))
        given = {**{k: v for k, v in vars(from_file).items() if k in names}, **given}
    return ns, given
