"""The commands' start, before their work: a Ctrl-C while Python still loads torch and the
modules behind a command (a second or two), or while the command reads its options and
checkpoints, ends it with one line and exit status 130, as one anywhere else does, not with a
traceback through the imports. Light on purpose: it is imported before torch.

Only for the command itself (python -m MODULE, or its console script): imported or called by
other code, a Ctrl-C stays that code's KeyboardInterrupt.
"""

import contextlib
import os
import sys

__all__ = ["INTERRUPTED_STATUS", "command_name", "is_command", "until_running"]

# 128 + SIGINT, as a shell reports a process that SIGINT ended.
INTERRUPTED_STATUS = 130


def command_name(script, module):
    """The command as the user started it, for its usage and error lines: the console script
    (capsnet-train, capsnet-evaluate), or python -m MODULE (also what torchrun runs)."""
    return script if os.path.basename(sys.argv[0]) == script else f"python -m {module}"


def is_command(module_name, script):
    """Whether the module named module_name (its __name__) runs as the command: python -m (as
    __main__), or through its console script."""
    return module_name == "__main__" or os.path.basename(sys.argv[0]) == script


@contextlib.contextmanager
def until_running(prog, command):
    """Around what a command does before its work: a Ctrl-C there ends it (SystemExit) with one
    line, from rank 0 alone under torchrun, where `command`; else the KeyboardInterrupt goes on."""
    try:
        yield
    except KeyboardInterrupt:
        if not command:
            raise
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"{prog}: interrupted (Ctrl-C) before its work began\n")
            sys.stderr.flush()
        raise SystemExit(INTERRUPTED_STATUS) from None
