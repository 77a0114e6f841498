"""Atomic writes, the package's one mechanism: a file or folder is written beside its final path under a temporary
name, then renamed into place, so a reader, a concurrent save or a resumed run finds the old version or the new one,
never half of one, and a killed write leaves only temporaries that the next write to the same place removes.

Imported by the model file, so it travels with saved checkpoints as remote code: it imports only installed libraries.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the platform or
    file system cannot, so the caller falls back to two renames."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no C library found, or a glibc older than 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(errno, f"{os.strerror(errno)}: exchanging {a} and {b}")


def replace_directory(new: Path, final: Path):
    """Make the finished folder `new` take the place of `final`. On Linux the two folders are exchanged in one atomic
    step, so a concurrent reader always finds a complete `final`, old or new; elsewhere the old folder is moved aside
    first and removed last (a short window, two renames, where `final` is missing). `new` keeps the mode of the
    folder it replaces (a new one gets the user's umask, as its files do); a folder that is read-only to its owner is
    refused, not replaced."""
    umask = os.umask(0)
    os.umask(umask)
    if final.exists() and not final.stat().st_mode & 0o200:
        raise PermissionError(f"{final} is read-only: not replacing it (make it writable to save there)")
    for path in new.rglob("*"):
        if not path.is_symlink():  # a link keeps pointing where it did; its target's mode is not ours to change
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    new.chmod(final.stat().st_mode & 0o7777 if final.exists() else 0o777 & ~umask)
    if not final.exists():
        new.rename(final)
    elif _exchange_paths(new, final):
        shutil.rmtree(new)  # now the previous version
    else:
        previous = final.with_name(f".{final.name}.previous-{os.getpid()}")
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
        new.rename(final)
        shutil.rmtree(previous)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]):
    """Call `write(temporary path)` beside `path`, then rename it over `path` in one step, so a reader (or a resumed
    run) finds the old file or the new one, never half of one; a failed or interrupted write leaves no temporary."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # only when the rename did not happen


def write_text_atomically(path: str | os.PathLike, text: str):
    write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))

@contextmanager
def exclusive_writer(folder: Path):
    """A lock on `.speeder-save.lock` in the folder that holds `folder` (filelock, which huggingface_hub uses for its
    cache), so two processes saving there take turns (one lock file per parent folder: a Trainer's many checkpoints
    share one); while it is held, temporaries that a killed save left beside `folder` are removed."""
    from filelock import FileLock

    # A singleton lock is reentrant, so a save may nest another in the same folder (a checkpoint of model + processor).
    with FileLock(folder.parent / ".speeder-save.lock", is_singleton=True):
        for pattern in (f".{folder.name}.saving-*", f".{folder.name}.previous-*"):
            for stale in folder.parent.glob(pattern):  # only a killed save of this folder leaves these
                shutil.rmtree(stale, ignore_errors=True)
        yield


def copy_entry(source: Path, target: Path):
    """Copy a file or folder with its metadata; a symbolic link stays a link (to the same place), not a copy."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True)
    else:
        shutil.copy2(source, target)


@contextmanager
def folder_written_atomically(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block ends without error it replaces `final`
    (`replace_directory`), otherwise it is removed and `final` is untouched. Writers to one parent folder take turns
    (`exclusive_writer`)."""
    final = Path(final)
    if final.exists() and (os.path.ismount(final) or final.resolve() == Path.cwd().resolve()):
        what = "a mount point" if os.path.ismount(final) else "the current folder"
        raise OSError(f"Cannot replace {final} as a whole ({what}), which an atomic save does: save into a folder "
                      "inside it")
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_writer(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.saving-", dir=final.parent))
        try:
            yield tmp
            replace_directory(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


__all__ = ["copy_entry", "exclusive_writer", "folder_written_atomically", "replace_directory", "write_atomically",
           "write_text_atomically"]
