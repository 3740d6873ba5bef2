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

__all__ = ["RunLog", "logged_prefix", "logged_results"]


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
        self.digest, self.length = logged_prefix(path, resume_from)
        # Records written after the checkpoint belong to steps that are about to be redone.
        self.file = open(path, "r+b")
        self.file.truncate(self.length)
        self.file.seek(self.length)

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


def logged_prefix(path, resume_from):
    """(SHA-256 object, length) of the first bytes of the log at `path` that last.pt's contents
    `resume_from` record; ValueError where the log is missing, shorter, or changed in them.
    --resume checks this before any work; RunLog checks it again as it opens the log."""
    length, expected = resume_from["log_bytes"], resume_from.get("log_sha256")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing but last.pt records {length} bytes of it; "
                         f"restore the log, or start a new run in another --out")
    with open(path, "rb") as f:
        prefix = f.read(length)
    if len(prefix) < length:
        raise ValueError(f"{path} has {len(prefix)} bytes, fewer than the {length} that last.pt "
                         f"records: the log was cut; restore it, or start a new run in another --out")
    digest = hashlib.sha256(prefix)
    # Checkpoints written before the digest existed: the prefix must at least be whole JSON lines.
    intact = digest.hexdigest() == expected if expected is not None else _is_json_lines(prefix)
    if not intact:
        raise ValueError(f"the first {length} bytes of {path} differ from those last.pt recorded: "
                         f"the log was changed or torn; restore it, or start a new run in another --out")
    return digest, length


def _is_json_lines(data):
    try:
        return data == b"" or (data.endswith(b"\n") and all(
            isinstance(json.loads(line), dict) for line in data.decode().splitlines()))
    except (UnicodeDecodeError, ValueError):
        return False


def logged_results(path):
    """The kinds of result records ("validation", "test") in the log at `path`, in the order first
    met: a run's results, which a new run in its folder would replace (its log and figures). []
    where there is no log or it holds only "train" records, of a run stopped before its first
    epoch ended. Lines that are not JSON records are passed over: any result still counts."""
    if not os.path.isfile(path):
        return []
    kinds = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, ValueError):
                continue
            kind = record.get("event") if isinstance(record, dict) else None
            if kind in ("validation", "test") and kind not in kinds:
                kinds.append(kind)
    return kinds
