"""How the commands (train, evaluate) end on an error a user can cause or meet.

Bad options end through argparse with exit status 2 (usage), and so does, before any work, what
the options point at that cannot serve: a missing, corrupt or foreign checkpoint, a run folder
in use. Everything found while running (data that is missing, corrupt or of another dataset, a
failed download, a full disk, a run that diverged) ends with one line, "PROG: error: what is
wrong and what to do", and exit status 1; --verbose shows the traceback as well. A training run
stopped by Ctrl-C after saving last.pt ends with one line saying how to continue, and exit status
130 (128 + SIGINT, as a shell reports a process that SIGINT ended), or 143 after SIGTERM; a
command stopped by Ctrl-C anywhere else (loading data, the final test, the figures, a second
Ctrl-C) ends with 130 and one line saying what is left to do.

Under torchrun every rank runs the command: a usage error, the same on every rank, is said by
rank 0 alone; an error found while running is said by each rank that meets it, "rank N: ..."
after the first; a rank that stops because another one failed says only that; Ctrl-C, which
torchrun passes to every rank, ends them with one line from rank 0.
"""

import argparse
import sys
import traceback

import torch
import torch.distributed as dist

from .distributed import launched_rank, launched_world_size
from .starting import INTERRUPTED_STATUS

__all__ = ["TrainingDiverged", "TrainingInterrupted", "USER_ERRORS", "ArgumentParser", "run_command"]


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
    """Ctrl-C (or SIGTERM) stopped the run at a step boundary, after saving last.pt there; the
    message says how to continue. Not a failure: the command ends with `status`, 128 + the
    signal's number as a shell reports a process the signal ended (INTERRUPTED_STATUS for
    Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message, status=INTERRUPTED_STATUS):
        super().__init__(message)
        self.status = status


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (with a pointer to --help), not the usage."""

    def error(self, message):
        # Under torchrun every rank parses the same command line: rank 0 alone says what is wrong.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if launched_rank() == 0 else None)


# OSError covers missing files, permissions, a full disk and download failures (DownloadError).
USER_ERRORS = (ValueError, OSError, TrainingDiverged, torch.OutOfMemoryError)


def _say(line):
    """One line on stderr in one write, so that the ranks' lines do not run into each other."""
    rank = launched_rank()
    sys.stderr.write(("" if rank == 0 else f"rank {rank}: ") + line + "\n")
    sys.stderr.flush()


def _another_rank_failed(error):
    """True for the error a rank meets when another one stopped: its collective lost the peer.
    gloo raises a plain RuntimeError for it, NCCL a DistBackendError."""
    return launched_world_size() > 1 and (isinstance(error, dist.DistError) or (
        type(error) is RuntimeError and "closed by peer" in str(error)))


def run_command(prog, verbose, function, *args, owns_ctrl_c=True, after_ctrl_c=None):
    """function(*args); 0 when it returns, 1 with a one-line message when it raises a USER_ERRORS,
    the exception's status with its message when it raises TrainingInterrupted, and
    INTERRUPTED_STATUS when Ctrl-C stops it: "PROG: interrupted (Ctrl-C)", then `after_ctrl_c()`
    (what is left to do) where given, said by rank 0 alone under torchrun. owns_ctrl_c=False,
    for a caller that passed the command's argv from Python (a test runner), leaves a single
    process's KeyboardInterrupt to that caller."""
    try:
        function(*args)
    except TrainingInterrupted as e:
        _say(f"{prog}: {e}")
        return e.status
    except KeyboardInterrupt:
        if launched_world_size() == 1 and not owns_ctrl_c:
            raise
        if launched_rank() == 0:
            _say(f"{prog}: interrupted (Ctrl-C)" + ("" if after_ctrl_c is None else f"; {after_ctrl_c()}"))
        return INTERRUPTED_STATUS
    except Exception as e:
        lost_peer = _another_rank_failed(e)
        if not isinstance(e, USER_ERRORS) and not lost_peer:
            raise
        if verbose:
            traceback.print_exc()
        if lost_peer:
            _say(f"{prog}: stopped because another rank failed (its error is above)")
        else:
            _say(f"{prog}: error: {str(e).strip() or type(e).__name__}")
        return 1
    return 0
