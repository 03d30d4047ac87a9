"""File modes for files written through a temporary file and a rename (adapter files, the measured-choice cache)."""

import os


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def give_mode(written: str, replaces: str) -> None:
    """Give ``written`` the mode of the file it ``replaces`` when that exists, else the mode a plain ``open`` would
    give (0o666 less the umask): ``tempfile.mkstemp`` (and safetensors' ``save_file``) create files readable by
    their owner only (0o600), which a file shared with other users (a cache folder, an adapter) must not be."""
    try:
        mode = os.stat(replaces).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    os.chmod(written, mode)
