"""A content-addressed, user-only cache of generated Python modules (the Anda Triton kernels).

A generated module is saved as ``<dir>/<stem>_<sha256[:12] of its text>.py`` (so a dump or a
debugger shows the real file) and imported from the *verified text*: an existing file runs only
if its content hashes to the digest in its name, otherwise it is rewritten, and the text executed
is the one that was checked (``linecache`` is primed with it, which is also where ``inspect`` --
hence Triton -- reads the kernel source back), so nothing swapped in between is ever run.

The directory is user-only: created ``0o700`` (tightened to it if it is ours and looser), files
``0o600``; a directory owned by another user is refused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import linecache
import os
import sys
from types import ModuleType

__all__ = ["private_dir", "source_path", "import_source"]


def private_dir(path: str, what: str = "kernel cache", env_var: str | None = None) -> str:
    """Create (``0o700``) or check ``path``: ours and user-only, tightened if looser."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if hasattr(os, "getuid"):
        if st.st_uid != os.getuid():
            hint = f"point {env_var} to a directory of your own" if env_var else "use a directory of your own"
            raise RuntimeError(f"{what} {path!r} belongs to another user: {hint}")
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
    return path


def digest(src: str) -> str:
    return hashlib.sha256(src.encode()).hexdigest()[:12]


def source_path(directory: str, stem: str, src: str) -> str:
    return os.path.join(directory, f"{stem}_{digest(src)}.py")


def _write_private(path: str, src: str) -> None:
    tmp = f"{path}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(src)
    os.replace(tmp, path)


def import_source(directory: str, stem: str, src: str, package: str) -> ModuleType:
    """Save ``src`` under ``directory`` (unless the verified file is there) and import it as
    ``<package>.<file stem>`` from the text itself."""
    path = source_path(directory, stem, src)
    try:
        with open(path) as f:
            on_disk = f.read()
    except FileNotFoundError:
        on_disk = None
    if on_disk is None or digest(on_disk) != digest(src):     # not what its name promises
        _write_private(path, src)
    mod_name = f"{package}.{os.path.basename(path)[:-3]}"
    linecache.cache[path] = (len(src), None, src.splitlines(True), path)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(mod_name, loader=None, origin=path))
    mod.__file__ = path
    sys.modules[mod_name] = mod            # triton resolves a kernel's globals through its module
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod
