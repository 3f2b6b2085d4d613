"""The argument parser every ``python -m stn_ext`` command uses, so that their errors look alike."""
import argparse
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one `error:` line and a pointer to --help (exit 2), the same
    as the commands' own checks print, rather than the whole usage block before the error."""

    def error(self, message):
        print(f"error: {message}\n(`{self.prog} --help` lists the options)", file=sys.stderr)
        sys.exit(2)
