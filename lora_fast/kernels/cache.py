"""The measured choices' shared state: one JSON file per GPU model and versions, shared by the processes of a
machine (``SharedTable``), and one value per ``torch.distributed`` job (``agree``). Used by kernels/choice.py."""

import json
import os
import re
import stat
import tempfile
import warnings
from typing import Callable, Dict, Optional

# the on-disk tables: a flat JSON object of short strings; anything else (or larger) is unreadable, so treated
# as empty and replaced on the next save. ~120 bytes per entry: room for ~8,000 keys
MAX_FILE_BYTES = 1 << 20
MAX_TEXT = 4096   # characters of a key or value (a tuning key with its constexprs: ~300-600)
LOCK_TIMEOUT_S = 10.0


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def cache_dir() -> str:
    """Where the measured choices are kept on disk: ``$LORA_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/lora_fast``,
    else ``~/.cache/lora_fast`` (``~`` and ``$VARS`` expanded)."""
    explicit = os.environ.get("LORA_FAST_CACHE_DIR", "").strip()
    if explicit:
        return _expand(explicit)
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return os.path.join(_expand(base) if base else os.path.join(os.path.expanduser("~"), ".cache"), "lora_fast")


def _versions() -> str:
    import torch
    import triton

    from .._version import __version__
    return f"torch{torch.__version__}-cuda{torch.version.cuda}-triton{triton.__version__}-lora_fast{__version__}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+]+", "_", text).strip("_")


_WARNED = set()


def _warn_once(what: str, message: str) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# a JSON string literal (unrolled: linear time on any input)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _parse_flat(data: bytes) -> Optional[Dict[str, str]]:
    """{str: str} from a flat JSON object, None when ``data`` is anything else. Nesting is refused before the
    parser sees it (json's recursion can raise RecursionError on deep input)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    skeleton = _STRING.sub("", text)
    if skeleton.count("{") != 1 or skeleton.count("}") != 1 or "[" in skeleton:
        return None
    try:
        table = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(table, dict):
        return None
    return {k: v for k, v in table.items() if isinstance(v, str) and len(k) <= MAX_TEXT and len(v) <= MAX_TEXT}


class SharedTable:
    """A {key text: value text} table in one JSON file, shared by the processes of a machine.

    Reads never block (a FIFO or a directory at the path is refused with a warning, not opened for reading);
    ``add`` merges under a file lock (``filelock``, the package torch itself depends on): it re-reads the file,
    keeps every entry already there (the first writer of a key wins, and its value is returned) and replaces the
    file atomically (a temporary file in the same directory, renamed; removed when anything fails). A file that
    is unreadable, nested, over ``MAX_FILE_BYTES`` or not a flat object of strings counts as empty and is
    replaced on the next ``add``. A read-only or full disk costs only the re-timing in a later process.
    """

    def __init__(self, path: str):
        self.path = path
        self._entries: Optional[Dict[str, str]] = None

    def _regular_or_absent(self) -> bool:
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if not stat.S_ISREG(mode):
            _warn_once(self.path, f"lora_fast: {self.path} is not a regular file; the GEMM choices are not kept on "
                                  f"disk (remove it, or set LORA_FAST_CACHE_DIR elsewhere)")
            return False
        return True

    def _read(self) -> Dict[str, str]:
        if not self._regular_or_absent():
            return {}
        try:
            # O_NONBLOCK: a FIFO swapped in after the check is opened without waiting for a writer
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return {}
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError:
            return {}
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_BYTES:
            return {}
        return _parse_flat(data) or {}

    def get(self, text: str) -> Optional[str]:
        """The value of ``text`` on disk: the file is read again on a miss (another process may have added it)."""
        if self._entries is None or text not in self._entries:
            entries = self._read()
            entries.update(self._entries or {})
            self._entries = entries
        return self._entries.get(text)

    def add(self, text: str, value: str) -> str:
        """Add ``text: value`` unless the file already holds ``text``; returns the value the file holds."""
        if self._entries is None:
            self._entries = {}
        directory = os.path.dirname(self.path)
        try:
            import filelock

            os.makedirs(directory, exist_ok=True)
            lock_path = self.path + ".lock"
            if os.path.lexists(lock_path) and not stat.S_ISREG(os.stat(lock_path).st_mode):
                _warn_once(lock_path, f"lora_fast: {lock_path} is not a regular file; choices are not saved")
                self._entries.setdefault(text, value)
                return self._entries[text]
            with filelock.FileLock(lock_path, timeout=LOCK_TIMEOUT_S):
                if not self._regular_or_absent():
                    self._entries.setdefault(text, value)
                    return self._entries[text]
                disk = self._read()
                self._entries.update(disk)
                if text in disk:
                    return disk[text]
                disk[text] = value
                self._entries[text] = value
                data = json.dumps(disk, indent=0, sort_keys=True).encode("utf-8")
                if len(data) > MAX_FILE_BYTES:
                    _warn_once(self.path, f"lora_fast: {self.path} is full ({MAX_FILE_BYTES} bytes); new choices "
                                          f"stay in memory (delete the file to start afresh)")
                    return value
                self._replace(directory, data)
        except Exception as e:   # filelock.Timeout, OSError: keep the choice in memory only
            _warn_once(directory, f"lora_fast: measured choices not saved under {directory} ({e}); a later process "
                                  f"measures them again")
            self._entries.setdefault(text, value)
        return self._entries[text]

    def _replace(self, directory: str, data: bytes) -> None:
        """Write ``data`` to a temporary file and rename it over the table (called under the lock: a temporary
        file of this table found now was left by a process killed mid-write, and is removed)."""
        prefix = os.path.basename(self.path) + "."
        for name in os.listdir(directory):
            if name.startswith(prefix) and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # mkstemp makes the file private (0o600): the machine's other users share this cache, so the table gets
            # the old file's mode, or a plain open()'s (this module imports nothing of the package:
            # lora_fast._files has the same rule for adapter files)
            umask = os.umask(0)
            os.umask(umask)
            try:
                mode = os.stat(self.path).st_mode & 0o7777
            except OSError:
                mode = 0o666 & ~umask
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def _job_store():
    """The key-value store of the initialised default ``torch.distributed`` process group, or None."""
    import sys

    dist = sys.modules.get("torch.distributed")   # not imported: no process group can be initialised
    if dist is None:
        return None
    try:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def published(name: str, valid: Callable[[str], bool] = lambda v: True) -> Optional[str]:
    """The value of ``name`` a rank published in the job's store (what ``agree`` takes without deciding) when
    ``valid`` accepts it; None outside ``torch.distributed``, before anyone published, or when the store fails.
    Reads only."""
    store = _job_store()
    if store is None:
        return None
    key = "lora_fast/" + name
    try:
        if store.check([key]):
            value = store.get(key).decode("utf-8")
            return value if valid(value) else None
    except Exception:   # a store that lost its server: agree() warns when the key is resolved
        return None
    return None


def agree(name: str, decide: Callable[[], str], valid: Callable[[str], bool] = lambda v: True) -> str:
    """One value per job for ``name``: outside ``torch.distributed`` (or before its init) ``decide()``; inside,
    the value the first rank to get here published in the job's store (``compare_set``: atomic, first writer
    wins), deciding and publishing it if none has. No collective call: ranks may meet keys in any order, or not
    all of them (dynamic shapes), without deadlock. A published value that ``valid`` rejects is ignored."""
    store = _job_store()
    if store is None:
        return decide()
    key = "lora_fast/" + name
    try:
        if store.check([key]):
            value = store.get(key).decode("utf-8")
            if valid(value):
                return value
        mine = decide()
        value = store.compare_set(key, "", mine).decode("utf-8")
        return value if valid(value) else mine
    except Exception as e:   # a store that lost its server: the run itself will fail on its next collective
        _warn_once("store", f"lora_fast: could not agree on {name!r} through torch.distributed's store ({e}); "
                            f"this rank decided alone")
        return decide()
