"""How an option is declared: once, as a field of an options dataclass, with its help and
argparse's extras (metavar, choices, nargs). Every parser is built from these fields here, with
plain argparse, so `--help` needs neither torch nor transformers and shows each default from the
field itself; `from_args` turns parsed arguments back into the dataclass, and `command_line`
writes a set of options as the command that would make them."""

import argparse
import shlex
import types
import typing
from dataclasses import MISSING, field, fields


def option(default=MISSING, help: str = "", group: str | None = None, **argparse_extras):
    """A dataclass field that is a command-line option: `--name`, typed by its annotation.
    `group` titles its section in --help. A field without a default is required."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_extras})


def is_option(f) -> bool:
    return "help" in f.metadata


def required(f) -> bool:
    """No default, or one that only code may leave (`required=True`: the command must be told)."""
    return (f.default is MISSING and f.default_factory is MISSING) or f.metadata.get("required", False)


def value_type(f) -> type:
    """The type a value is parsed to: `int | None` -> int."""
    if isinstance(f.type, types.UnionType) or typing.get_origin(f.type) is typing.Union:
        return next(a for a in typing.get_args(f.type) if a is not type(None))
    return f.type


def shown_default(f) -> str | None:
    """How --help states a field's default; None where it says nothing (required, or unset)."""
    if required(f) or f.default is None or f.default == "":
        return None
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"takes yes or no (got {text!r})")


def spellings(name: str) -> list[str]:
    """--flag_name, and --flag-name beside it."""
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def add_options(parser: argparse.ArgumentParser, options: list, last_group: str | None = None,
                regroup: dict | None = None):
    """One argument per option field, in a --help section per group (`regroup` moves a group's
    options into another): the untitled options first, `last_group` last. A yes/no option is
    `--x` (or `--x yes|no`) and `--no_x`."""
    def group(f):
        return (regroup or {}).get(f.metadata["group"], f.metadata["group"])

    order = list(dict.fromkeys(group(f) for f in options))
    order.sort(key=lambda g: (g is not None, g == last_group))
    sections = {g: parser if g is None else parser.add_argument_group(g) for g in order}
    for f in options:
        section = sections[group(f)]
        extras = {k: v for k, v in f.metadata.items() if k not in ("help", "group", "required")}
        if callable(extras.get("choices")):  # a registry's names, read when the parser is built
            extras["choices"] = extras["choices"]()
        if value_type(f) is bool:
            action = section.add_argument(*spellings(f.name), dest=f.name, type=to_bool,
                                          nargs="?", const=True, default=f.default,
                                          help=f.metadata["help"])
            action.negation = f"--no_{f.name}"
            section.add_argument(*spellings(f"no_{f.name}"), dest=f.name, action="store_false",
                                 help=argparse.SUPPRESS)
            continue
        action = section.add_argument(*spellings(f.name), dest=f.name, type=value_type(f),
                                      required=required(f),
                                      default=None if required(f) else f.default,
                                      help=f.metadata["help"], **extras)
        action.shown_default = shown_default(f)


class HelpFormatter(argparse.HelpFormatter):
    """--help in the tool's words: a yes/no option as `--x / --no_x`, one spelling per flag (the
    dashed ones are accepted too), each default once and only where there is one, a paragraph
    wrapped and the examples (text of several lines) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _format_action_invocation(self, action):
        if getattr(action, "negation", None):
            return f"{action.option_strings[0]} / {action.negation}"
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{action.option_strings[0]} {metavar}"

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if getattr(action, "negation", None):
            return f"{text} (default: {'on' if action.default else 'off'})"
        shown = getattr(action, "shown_default", None)
        return f"{text} (default: {shown})" if shown is not None else text


class Parser(argparse.ArgumentParser):
    """A usage error is one line that says what is wrong and where the help is, not the whole
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def read_config(path: str, options: list, command: str) -> dict:
    """A recipe file's values (YAML, or JSON by its suffix: option name -> value), each typed
    as its option, for the parser to take as defaults: the command line overrides them."""
    import json

    import yaml

    from .errors import UsageError

    def unique(pairs):
        names = [name for name, _ in pairs]
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:  # both loaders would keep the last value without a word
            raise UsageError(f"--config {path} names {', '.join(twice)} more than once; keep "
                             "one value for each option")
        return dict(pairs)

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            return unique([(self.construct_object(key, deep=deep),
                            self.construct_object(value, deep=deep))
                           for key, value in node.value])

    try:
        text = open(path, encoding="utf-8").read()
        values = (json.loads(text, object_pairs_hook=unique) if path.endswith(".json")
                  else yaml.load(text, Loader=Loader))
    except OSError as e:
        raise UsageError(f"cannot read --config {path} ({e.strerror or e}); pass a recipe file "
                         "(YAML or JSON: option name -> value)")
    except (ValueError, yaml.YAMLError) as e:
        where = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--config {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}"
                         f" ({where}); fix the file")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must map option names to values (`lr: 0.001`), "
                         f"not hold a {type(values).__name__}")
    known = {f.name: f for f in options}
    out = {}
    for name, value in values.items():
        key = str(name).replace("-", "_")
        if key not in known:
            raise UsageError(f"--config {path}: {name!r} is not an option of `latentwire "
                             f"{command}`; see `latentwire {command} --help`")
        f = known[key]
        kind = value_type(f)
        if value is None and kind is f.type and f.default is not None:  # `name:` and nothing
            raise UsageError(f"--config {path}: {name} is empty; give it a {kind.__name__} or "
                             "leave the line out for its default")
        try:
            if value is None or kind is bool and isinstance(value, bool):
                out[key] = value
            elif kind is bool:
                out[key] = to_bool(str(value))
            else:
                out[key] = kind(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UsageError(f"--config {path}: {name} takes {kind.__name__} (got {value!r})")
        choices = f.metadata.get("choices")
        choices = choices() if callable(choices) else choices
        if choices is not None and out[key] is not None and out[key] not in choices:
            raise UsageError(f"--config {path}: {name} {out[key]!r} is not one of "
                             f"{', '.join(map(str, choices))}")
    return out


def from_args(cls, args, **extra):
    """`cls` from parsed arguments: every option of cls the parser had; the rest as defaults."""
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in fields(cls) if is_option(f) and f.name in given},
                 **extra)


def command_line(words: list[str], opts, spelled: tuple = (), skip: tuple = ()) -> str:
    """`words` followed by every option of `opts` that differs from its default (and the
    `spelled` ones always), as a shell-quoted command that parses back into the same options."""
    default = type(opts)()
    parts = list(words)
    for f in fields(opts):
        value = getattr(opts, f.name)
        if not is_option(f) or f.name in skip or value is None or (
                value == getattr(default, f.name) and f.name not in spelled):
            continue
        if isinstance(value, bool):  # the parser's spellings of a yes/no option
            parts += [f"--{f.name}"] if value else [f"--no_{f.name}"]
        else:
            parts += [f"--{f.name}", str(value)]
    return shlex.join(parts)
