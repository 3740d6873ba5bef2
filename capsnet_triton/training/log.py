"""The JSON-lines log of a run (RUN_DIR/log.jsonl): one record per line, "train" every
--log-every steps, "validation" every epoch, "test" at the end."""

import json

__all__ = ["RunLog"]


class RunLog:
    """The log file, written by rank 0 only; other ranks hold a closed stand-in.

    truncate_to: on resume, the log's length when the checkpoint was written; None for a fresh run.
    """

    def __init__(self, path, enabled, truncate_to=None):
        self.path, self.file = path, None
        if not enabled:
            return
        if truncate_to is None:
            # A fresh run: the log of an earlier run in RUN_DIR that never reached a checkpoint goes.
            self.file = open(path, "w")
            return
        # Records written after the checkpoint belong to steps that are about to be redone.
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
        self.file = open(path, "a")

    def write(self, **record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def size(self):
        return self.file.tell() if self.file is not None else 0

    def close(self):
        if self.file is not None:
            self.file.close()
