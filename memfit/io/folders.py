"""Where memfit writes an output folder: refused before any work when it cannot be written or
would be lost (`check_output`), filled under a temporary name of the call's own and renamed into
place only when complete (`write_folder`), so an interrupted or failed run leaves nothing
half-written at the output path."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from memfit.errors import UserError

_WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}


def check_output(out: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse, before any work, an output folder that cannot be written or would be lost: an
    existing one without `overwrite` (or one that is not a model folder), one of the inputs,
    a path under a file, an unwritable parent."""
    out = Path(out).expanduser()
    for src in inputs:
        if src is not None and Path(src).expanduser().exists() and \
                Path(src).expanduser().resolve() == out.resolve():
            raise UserError(f"--out {out} is the input model's own folder; write to another "
                            "folder (the input would be destroyed while it is read)")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists; pass overwrite=True (--overwrite) or choose "
                            "another output folder")
        looks_like_model = out.is_dir() and (not any(out.iterdir()) or (out / "config.json").exists())
        if not looks_like_model:
            raise UserError(f"refusing to replace {out}: it is not an empty or model folder; "
                            "choose another output folder")
    _check_parent(out)


def check_output_file(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output file (a GGUF) that cannot be written or would be lost:
    an existing one without `overwrite`, a folder, a place where nothing can be made."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"{out} is a folder; --out names the file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite or choose another file")
    _check_parent(out)


def _check_parent(out: Path) -> None:
    """The nearest existing folder above `out` must take a new folder: tried, since permission
    bits say nothing to root, nor of read-only mounts and kernel file systems (/proc)."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: {parent} is a file, not a folder; choose another "
                        "--out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".memfit-probe-", dir=parent))
    except OSError as e:
        why = _WRITE_ERRORS.get(e.errno, e.strerror or "it cannot be written")
        raise UserError(f"cannot write {out}: no folder can be made in {parent} ({why}); "
                        "choose another --out") from None


def raise_write_error(out: Path, e: OSError) -> None:
    """Raise a UserError for a failed write the user can act on (disk full, permissions...);
    return for any other error (the caller re-raises it)."""
    if e.errno in _WRITE_ERRORS:
        raise UserError(f"cannot write {out}: {_WRITE_ERRORS[e.errno]}; free some space or "
                        "choose another output folder") from None


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_folder(out: Path, fill, *, keep_existing: bool = False) -> Path:
    """Run `fill(tmp)` on a fresh `<out>.tmp-<pid>-<random>` folder of this call's own, then
    rename it to `out` (replacing an existing one, which `check_output` allowed). Nothing
    appears at `out` unless `fill` finished; a full disk or a permission problem is a UserError.
    keep_existing (a cache that several processes may fill at once): when `out` exists by the
    time `fill` finishes, that copy stays and this one is dropped."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_write_error(out, e)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing:
        try:
            tmp.rename(out)  # fails where another process's copy landed first (not empty)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not out.exists():
                raise
        return out
    _swap_in(tmp, out)
    return out
