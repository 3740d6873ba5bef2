"""How the commands (train, evaluate) end on an error a user can cause or meet.

Bad options end through argparse with exit status 2 (usage). Everything found while running
(data that is missing, corrupt or of another dataset, a corrupt checkpoint, a full disk, a run
that diverged) ends with one line, "PROG: error: what is wrong and what to do", and exit
status 1; --verbose shows the traceback as well.
"""

import argparse
import sys
import traceback

import torch

__all__ = ["TrainingDiverged", "USER_ERRORS", "ArgumentParser", "run_command"]


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a parameter became NaN or infinite: the run is stopped."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (with a pointer to --help), not the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# OSError covers missing files, permissions, a full disk and download failures (DownloadError).
USER_ERRORS = (ValueError, OSError, TrainingDiverged, torch.OutOfMemoryError)


def run_command(prog, verbose, function, *args):
    """function(*args); 0 when it returns, 1 with a one-line message when it raises a USER_ERRORS."""
    try:
        function(*args)
    except USER_ERRORS as e:
        if verbose:
            traceback.print_exc()
        message = str(e).strip() or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0
