"""Command line: ``python -m stn_ext COMMAND [options]``; ``python -m stn_ext COMMAND --help`` for each."""
import importlib
import sys

COMMANDS = {
    "demo": ("stn_ext.tuning.demo", "demo", "STN vs Delta-STN vs fixed vs random search on digits (the README demo)"),
    "train": ("stn_ext.tuning.cli", "main", "bilevel training of a model with self-tuning hyperparameters"),
    "reversible": ("stn_ext.reversible.cli", "main", "hypergradients through exactly reversed SGD with momentum"),
}


def usage():
    lines = ["usage: python -m stn_ext COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `python -m stn_ext COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"stn_ext: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
