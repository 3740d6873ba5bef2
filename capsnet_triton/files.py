"""Writing the files the project keeps (checkpoints, figures, evaluate's scores, bench's JSON) so
that a failure (a full disk, an error while making the contents, a kill) never leaves one half
written."""

import contextlib
import os
import tempfile

from .data import default_permissions

__all__ = ["atomic_write", "fsync_directory"]


@contextlib.contextmanager
def atomic_write(path):
    """A binary file to write `path`'s new contents to, renamed onto `path` when the block ends:
    a reader (or a resumed run after a kill) sees either the old file or the complete new one.

    The file is a temporary one beside `path`, synced before the rename, and the folder after
    it. Any failure removes it and leaves `path` as it was; an OSError is raised again as one
    naming `path`, its errno kept, so that the commands' one-line error says which file could
    not be written (rather than a temporary name, or none).
    """
    directory = os.path.dirname(os.path.abspath(path))
    partial = None
    try:
        fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            default_permissions(f.fileno())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        if e.errno is None:            # not the file system's (say, a figure's own): as it is
            raise
        raise OSError(e.errno, f"could not write {os.fspath(path)}: {e.strerror or e}") from e
    finally:
        if partial is not None and os.path.exists(partial):
            os.remove(partial)
    fsync_directory(directory)          # the file is written: a failure here is the folder's


def fsync_directory(directory):
    """Make a rename in `directory` durable (a crash after it cannot bring back the old entry)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
