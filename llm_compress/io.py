"""Files: digests, atomic writes, versions.

Rule for every writer in this project: build the result in a temporary sibling path and rename it
into place only once it is complete, so an interrupted or failed stage never leaves a
half-written output where a finished one used to be.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

_CHUNK = 1 << 20
# A file modified less than this long ago gets no memo entry: a second write within the filesystem's timestamp
# granularity could leave size and mtime as they were (git's "racily clean" entries); the next digest stores it.
MEMO_MIN_AGE_S = 2.0


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def memo_sha256(path: str | Path, memo_dir: str | Path) -> str:
    """sha256 of a file, reusing the digest stored in ``memo_dir`` while the file's (resolved path, size, mtime_ns,
    inode) are what they were when it was computed, so an unchanged multi-GB input is not read again.

    One small JSON file per resolved path (named by its hash), written atomically (temp file + ``os.replace``); a
    missing, corrupt or stale entry is recomputed and rewritten. Not stored: a digest of a file that changed while
    it was read, or that was modified less than :data:`MEMO_MIN_AGE_S` ago. An edit that keeps size, mtime_ns and
    inode alike (e.g. an mtime set back on purpose) goes unseen: the price of not reading the file.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    entry = Path(memo_dir) / f"{hashlib.sha256(str(p).encode()).hexdigest()[:32]}.json"
    try:
        rec = json.loads(entry.read_text())
        if rec["key"] == key and isinstance(rec["sha256"], str) and len(rec["sha256"]) == 64:
            return rec["sha256"]
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no entry, or a corrupt one: recompute
    digest = sha256_file(p)
    after = p.stat()
    unchanged = (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    if unchanged and time.time_ns() - st.st_mtime_ns >= MEMO_MIN_AGE_S * 1e9:
        write_json_atomic(entry, {"key": key, "sha256": digest})
    return digest


def digest_path(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """sha256 of a file, or of a directory's (relative path, file digest) list, sorted.

    Ignores ``manifest.json`` so a stage folder's digest names its outputs only. ``memo_dir`` (outside ``path``):
    reuse each file's digest while the file is unchanged (:func:`memo_sha256`); the result is the same as without.
    """
    p = Path(path)
    file_digest: Callable[[Path], str] = sha256_file if memo_dir is None else (lambda f: memo_sha256(f, memo_dir))
    if p.is_file():
        return file_digest(p)
    if not p.is_dir():
        raise FileNotFoundError(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() and q.name != "manifest.json"):
        h.update(f.relative_to(p).as_posix().encode())
        h.update(b"\0")
        h.update(file_digest(f).encode())
        h.update(b"\n")
    return h.hexdigest()


def path_size(path: str | Path) -> int:
    """Bytes on disk of a file or all files under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or the
    file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``. An existing ``final`` is swapped with ``tmp`` in one step where the OS can (so a
    reader never finds ``final`` missing), else moved aside first; the old contents are then deleted."""
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old contents
        return
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``final``; rename it to ``final`` on success.

    On an exception the temporary directory is removed and ``final`` (if it existed) is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), for cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "optimum", "optimum-onnx",
             "onnxruntime", "onnxruntime-gpu", "bitsandbytes", "prefect", "pydantic", "numpy", "datasets")


def package_versions(names: tuple[str, ...] | list[str] = _PACKAGES) -> dict[str, str]:
    from importlib import metadata  # here: importing it costs ~20 ms that only keys and manifests need

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


_ROOT = Path(__file__).resolve().parent  # the stages package
_CODE_VERSION: str | None = None
# Modules whose edits never change what a stage computes: the recipe's schema (the frame, and each package's
# ``config`` module: their resolved values are in the key already), the interface, the registry and the report.
# They are left out of every stage's code version.
_NOT_CODE = ("llm_compress.config", "llm_compress.schema", "llm_compress.stage", "llm_compress.pipeline",
             "llm_compress.report", "llm_compress.runner")


def _not_code(module: str, root: str) -> bool:
    return module.endswith(".config") or any(module == x or module.startswith(x + ".") for x in _NOT_CODE
                                             if x != root)


def code_version() -> str:
    """Content hash of the whole ``stages`` package (plus its version string), recorded in manifests."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        from llm_compress import __version__

        h = hashlib.sha256(__version__.encode())
        for f in sorted(_ROOT.rglob("*.py")):
            h.update(f.relative_to(_ROOT).as_posix().encode())
            h.update(f.read_bytes())
        _CODE_VERSION = f"{__version__}+{h.hexdigest()[:12]}"
    return _CODE_VERSION


def _module_file(name: str) -> Path | None:
    """The source file of a ``stages.*`` module or package, or None if there is none (or it is not in ``stages``)."""
    parts = name.split(".")
    if parts[0] != "llm_compress" or len(parts) < 2:
        return None
    rel = Path(*parts[1:])
    for cand in (_ROOT / rel.with_suffix(".py"), _ROOT / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported(path: Path) -> set[str]:
    """Every ``stages.*`` module a file imports, at any depth in it (lazy imports inside functions too)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
        for n in names:
            parts = n.split(".")
            if parts[0] == "llm_compress":  # a module also runs its packages' __init__
                found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return found


def module_closure(root: str) -> list[Path]:
    """Source files of ``root`` and of every ``stages`` module it can import, transitively (sorted)."""
    seen: set[str] = set()
    todo = [root]
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        f = _module_file(name)
        if f is None:
            continue
        files.add(f)
        todo.extend(m for m in _imported(f) if m not in seen and not _not_code(m, root))
    return sorted(files)


_STAGE_CODE: dict[str, str] = {}


def stage_code_version(module: str) -> str:
    """Content hash of the code one stage runs: its module and what it imports from ``stages``, transitively.

    Part of the stage's cache key: editing the export code invalidates exports, not a finished distillation
    (whose code never imports the export module).
    """
    if module not in _STAGE_CODE:
        h = hashlib.sha256()
        for f in module_closure(module):
            h.update(f.relative_to(_ROOT).as_posix().encode() + b"\0" + f.read_bytes())
        _STAGE_CODE[module] = h.hexdigest()[:16]
    return _STAGE_CODE[module]


def git_commit() -> str | None:
    """The project's git commit, when it runs from a checkout (recorded for lineage only)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
