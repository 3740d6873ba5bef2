"""The JSON-lines log of a run (RUN_DIR/log.jsonl): one record per line, "train" every
--log-every steps, "validation" every epoch, "test" at the end.

The log is as durable as the checkpoint: every save of last.pt first fsyncs the log and records
its length and SHA-256, and a resumed run continues only from a log whose first bytes are
exactly those (a log cut short or changed is refused, never padded or half-read). Records are
strict JSON: a non-finite number is an error, not a `NaN` token that JSON readers reject.
"""

import hashlib
import json
import os

__all__ = ["RunLog"]


class RunLog:
    """The log file, written by rank 0 only; other ranks hold a closed stand-in.

    resume_from: on resume, last.pt's contents (their "log_bytes" and "log_sha256" say which
    prefix of the log belongs to the run so far); None for a fresh run.
    """

    def __init__(self, path, enabled, resume_from=None):
        self.path, self.file, self.digest, self.length = path, None, hashlib.sha256(), 0
        if not enabled:
            return
        if resume_from is None:
            # A fresh run: the log of an earlier run in RUN_DIR that never reached a checkpoint goes.
            self.file = open(path, "wb")
            return
        length, expected = resume_from["log_bytes"], resume_from.get("log_sha256")
        self._check_prefix(length, expected)
        # Records written after the checkpoint belong to steps that are about to be redone.
        self.file = open(path, "r+b")
        self.file.truncate(length)
        self.file.seek(length)

    def _check_prefix(self, length, expected):
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path} is missing but last.pt records {length} bytes of it; "
                             f"restore the log, or start a new run in another --out")
        with open(self.path, "rb") as f:
            prefix = f.read(length)
        if len(prefix) < length:
            raise ValueError(f"{self.path} has {len(prefix)} bytes, fewer than the {length} that last.pt "
                             f"records: the log was cut; restore it, or start a new run in another --out")
        self.digest.update(prefix)
        self.length = length
        # Checkpoints written before the digest existed: the prefix must at least be whole JSON lines.
        intact = (self.digest.hexdigest() == expected if expected is not None else _is_json_lines(prefix))
        if not intact:
            raise ValueError(f"the first {length} bytes of {self.path} differ from those last.pt recorded: "
                             f"the log was changed or torn; restore it, or start a new run in another --out")

    def write(self, **record):
        if self.file is not None:
            line = (json.dumps(record, allow_nan=False) + "\n").encode()
            self.file.write(line)
            self.file.flush()
            self.digest.update(line)
            self.length += len(line)

    def sync(self):
        """Make every record written so far durable (before a checkpoint records the log's length)."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def size(self):
        return self.length

    def sha256(self):
        return self.digest.hexdigest()

    def close(self):
        if self.file is not None:
            self.sync()
            self.file.close()


def _is_json_lines(data):
    try:
        return data == b"" or (data.endswith(b"\n") and all(
            isinstance(json.loads(line), dict) for line in data.decode().splitlines()))
    except (UnicodeDecodeError, ValueError):
        return False
