"""How the commands (train, evaluate) end on an error a user can cause or meet.

Bad options end through argparse with exit status 2 (usage). Everything found while running
(data that is missing, corrupt or of another dataset, a corrupt checkpoint, a full disk, a run
that diverged) ends with one line, "PROG: error: what is wrong and what to do", and exit
status 1; --verbose shows the traceback as well. A training run stopped by Ctrl-C after saving
last.pt ends with one line saying how to continue, and exit status 130 (128 + SIGINT, as a shell
reports a process that SIGINT ended).
"""

import argparse
import sys
import traceback

import torch

__all__ = ["TrainingDiverged", "TrainingInterrupted", "INTERRUPTED_STATUS", "USER_ERRORS", "ArgumentParser",
           "run_command"]

INTERRUPTED_STATUS = 130


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a parameter became NaN or infinite: the run is stopped.

    what: what diverged and what was kept; the message adds what to do. A smaller --lr (the usual
    cause; or a smaller --reconstruction-weight, ...) needs a new run: these are part of the run's
    configuration, which --resume refuses to change, and the folder keeps the run's log.
    """

    def __init__(self, what):
        super().__init__(f"training diverged: {what}; start a new run (another --out) with a smaller --lr, "
                         f"or whichever other setting made it diverge")


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run at a step boundary, after saving last.pt there; the message says
    how to continue. Not a failure: the command ends with INTERRUPTED_STATUS."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (with a pointer to --help), not the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# OSError covers missing files, permissions, a full disk and download failures (DownloadError).
USER_ERRORS = (ValueError, OSError, TrainingDiverged, torch.OutOfMemoryError)


def run_command(prog, verbose, function, *args):
    """function(*args); 0 when it returns, 1 with a one-line message when it raises a USER_ERRORS,
    INTERRUPTED_STATUS with its message when it raises TrainingInterrupted."""
    try:
        function(*args)
    except TrainingInterrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return INTERRUPTED_STATUS
    except USER_ERRORS as e:
        if verbose:
            traceback.print_exc()
        message = str(e).strip() or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0
