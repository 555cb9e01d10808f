"""How an option is declared: once, as a field of an options dataclass, with its help and
argparse's extras (metavar, choices, nargs). The command builds every parser from these fields
(with transformers' HfArgumentParser), so `--help` shows each default from the field itself;
`from_args` turns parsed arguments back into the dataclass, and `command_line` writes a set of
options as the command that would make them."""

import shlex
from dataclasses import MISSING, field, fields


def option(default=MISSING, help: str = "", group: str | None = None, **argparse_extras):
    """A dataclass field that is a command-line option: `--name`, typed by its annotation.
    `group` titles its section in --help."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_extras})


def is_option(f) -> bool:
    return "help" in f.metadata


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
        if isinstance(value, bool):  # the parser's spellings of a boolean option
            parts += ([f"--{f.name}"] if value else [f"--no_{f.name}"]
                      if getattr(default, f.name) else [f"--{f.name}", "false"])
        else:
            parts += [f"--{f.name}", str(value)]
    return shlex.join(parts)
