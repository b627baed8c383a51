"""Writing an output folder atomically: it appears complete, or not at all, and a finished one is never lost.

    with AtomicFolder(out, overwrite, needs_bytes=estimate) as tmp:
        ...write everything into tmp...

The output is written to a temporary sibling `.NAME.tmp-XXXXXXXX` and renamed into place when the block
ends without an error; on an error the temporary folder is removed. That alone does not cover a run that is
stopped from outside, which is how long prunes usually end badly:

  * SIGTERM, SIGHUP (a closed terminal) and SIGINT (Ctrl-C) inside the block raise in the main thread, so
    the temporary folder is removed and the process exits non-zero (128 + the signal for SIGTERM/SIGHUP).
    While the folder is being renamed into place or removed, a signal waits until that is done.
  * SIGKILL (or a power cut) cannot be caught: the temporary folder holds a marker with the owner's PID and
    host, and the next AtomicFolder for the same output removes such folders whose owner is dead. Folders of
    a live run, of another host, or without a marker are left alone, with a warning.
  * A finished folder is never deleted: the marker is removed before the rename, so no later run takes it
    for a stray, and if the rename cannot happen the message says where the finished output is.
  * overwrite replaces only what moeprune may replace (`replaceable`): an empty folder or an earlier moeprune
    output (it holds a plan.json that parses as a moeprune plan). Anything else in its place is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import uuid
import warnings
from pathlib import Path

from .arch import MoePruneError
from .preflight import check_free_space

MARKER = ".moeprune-owner"      # inside a temporary folder while it is being written: {"pid", "host"}
CAUGHT = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]


class Terminated(SystemExit):
    """SIGTERM or SIGHUP inside an AtomicFolder block: unwinds like sys.exit(128 + signal number)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


# ---------------------------------------------------------------- strays of killed runs

def _owner(folder: Path) -> dict | None:
    try:
        owner = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner["pid"] > 0
    return owner if ok else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                 # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:             # it exists, owned by another user
        pass
    return True


def _strays(out: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-[0-9a-f]+")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def remove_strays(out: Path) -> None:
    """Remove the temporary folders `.NAME.tmp-*` that killed runs left for `out`, with a warning for each.
    Only a folder whose marker names a dead process on this host is removed; the others are reported."""
    for folder in _strays(Path(out)):
        owner = _owner(folder)
        if owner is None:
            warnings.warn(f"leaving {folder}: it has no moeprune owner marker (an older moeprune's leftover, or a "
                          "finished output that could not be moved into place); delete it if nothing writes it")
        elif owner.get("host") != socket.gethostname():
            warnings.warn(f"leaving {folder}: it belongs to PID {owner['pid']} on host {owner.get('host')}, "
                          "which cannot be checked from here; delete it if that run is over")
        elif _alive(owner["pid"]):
            warnings.warn(f"leaving {folder}: a running process (PID {owner['pid']}) is writing the same output")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            warnings.warn(f"removed {folder}: the unfinished output of a killed run (PID {owner['pid']})")


def replaceable(folder: Path) -> bool:
    """An empty folder, or one moeprune wrote: it holds a plan.json that parses as a moeprune plan."""
    from .plan import Plan
    try:
        if not Path(folder).is_dir() or Path(folder).is_symlink():
            return False
        if not any(Path(folder).iterdir()):
            return True
        Plan.load(Path(folder) / "plan.json")
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return False
    return True


# ---------------------------------------------------------------- the folder

class AtomicFolder:
    """`with AtomicFolder(out) as tmp:` write into tmp; on success tmp replaces out, on error it is removed.

    overwrite: replace an existing out (else an out that appeared meanwhile is an error). needs_bytes: check
    on entry that the filesystem has room for that much (plus a margin). See the module docstring for
    signals and the leftovers of killed runs."""

    def __init__(self, out: str | Path, overwrite: bool = False, needs_bytes: int | None = None):
        self.out, self.overwrite, self.needs_bytes = Path(out), overwrite, needs_bytes
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._previous: dict[int, object] = {}
        self._settling = False              # renaming into place or removing: signals wait
        self._pending: int | None = None    # a signal that arrived while settling

    def __enter__(self) -> Path:
        if self.overwrite and self.out.exists() and not replaceable(self.out):
            raise MoePruneError(self._foreign())
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoePruneError(f"--out {self.out}: cannot create {self.out.parent} ({e.strerror or e}); choose a "
                                "folder you can write to") from None
        remove_strays(self.out)
        if self.needs_bytes is not None:
            check_free_space(self.out.parent, self.needs_bytes)
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise MoePruneError(f"--out {self.out}: cannot create a folder in {self.out.parent} "
                                f"({e.strerror or e}); choose a folder you can write to") from None
        try:
            (self.tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self._install()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        self._settling = True
        try:
            if exc_type is None:
                self._commit()
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._restore()
        if self._pending == signal.SIGINT:
            raise KeyboardInterrupt
        if self._pending is not None:
            raise Terminated(self._pending)

    def _kept(self) -> str:
        return f"The finished output is kept in {self.tmp}: move it where you want it (mv {self.tmp} NEW_FOLDER)"

    def _foreign(self) -> str:
        return (f"--out {self.out} is a folder moeprune did not write (it has no moeprune plan.json); --overwrite "
                "replaces only an empty folder or an earlier moeprune output, so it is left alone")

    def _commit(self) -> None:
        (self.tmp / MARKER).unlink()        # finished: from here on no later run may take it for a stray
        if self.out.exists() and not self.overwrite:
            raise MoePruneError(f"--out {self.out} appeared while pruning; not replacing it. {self._kept()}")
        if self.out.exists() and not replaceable(self.out):
            raise MoePruneError(f"{self._foreign()}. {self._kept()}")
        old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}" if self.out.exists() else None
        try:
            if old is not None:
                os.rename(self.out, old)
            os.rename(self.tmp, self.out)
        except OSError as e:
            if old is not None and old.exists() and not self.out.exists():
                os.rename(old, self.out)
            raise MoePruneError(f"could not move the output into {self.out} ({e}). {self._kept()}") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame) -> None:
        if self._settling:
            self._pending = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise Terminated(signum)

    def _install(self) -> None:
        """Handle the signals whose handler is still the default one (an ignored signal stays ignored, a
        caller's own handler stays in charge); only the main thread can install handlers."""
        if threading.current_thread() is not threading.main_thread():
            return
        defaults = {signum: signal.SIG_DFL for signum in CAUGHT} | {signal.SIGINT: signal.default_int_handler}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
