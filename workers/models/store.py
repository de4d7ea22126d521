"""Model directories on disk: checksums, path confinement, task detection and a version's place in the store.

The API imports this module to register models and never imports torch: nothing here touches torch or
transformers, not even lazily (building the built-ins, which does, lives in workers/models/builtins.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from workers.errors import ModelIntegrityError, PermanentJobError

# Written last into a built model directory (workers/models/builtins.py); its presence means "complete". It also
# caches the checksum, so a restart does not re-hash half a gigabyte. It is not part of the model, hence left out
# of directory_sha256.
MARKER = ".lmbatch-complete.json"
_CHUNK = 1 << 20

# Tenant versions live under this folder of the store; a catalogue name cannot start with "_" (version_dir).
TENANT_DIR = "_tenants"
# Weights in these formats are pickles (torch.save, joblib): loading one runs whatever code it holds. An import
# must bring safetensors instead.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"})

TASKS = ("causal-lm", "encoder", "sequence-classification")
_KINDS = {
    "causal-lm": ["generate", "classify", "embed", "finetune"],
    "encoder": ["embed", "classify", "finetune"],
    "sequence-classification": ["classify", "finetune"],
}


class UnsafeModelDirectory(ValueError):
    """A directory offered for import holds what lmbatch never loads or copies: a symbolic link, a special file
    (FIFO, device, socket), or pickle-based weights. The message names the entry, relative to the directory."""


class PathNotAllowedError(PermanentJobError, ValueError):
    """A model path resolves outside the allowed roots.

    Both a PermanentJobError (a worker fails the shard, never retries) and a ValueError (the API answers 400).
    """

    code = "path_not_allowed"


def directory_sha256(path: Path) -> str:
    """Hex sha256 over every file under ``path``: sorted relative POSIX paths, sizes and streamed contents.

    The path and size go in before each file's bytes so that moving bytes between files changes the digest.
    Symlinked files are hashed by content (Hugging Face caches are symlinks to blobs).
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelIntegrityError(f"model directory {root} does not exist")
    digest = hashlib.sha256()
    for rel in _files(root):
        full = root / rel
        digest.update(rel.encode() + b"\0")
        digest.update(full.stat().st_size.to_bytes(8, "big"))
        with full.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def directory_bytes(path: Path) -> int:
    """The size of the files ``directory_sha256`` hashes: what a version costs its owner's stored-bytes quota."""
    root = Path(path)
    return sum((root / rel).stat().st_size for rel in _files(root))


def _files(root: Path) -> list[str]:
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MARKER:
                found.append(rel)
    return sorted(found)


def verify_checksum(path: Path, expected: str) -> None:
    """Raise ModelIntegrityError unless the directory still hashes to ``expected``."""
    actual = directory_sha256(path)
    if actual != expected.lower():
        raise ModelIntegrityError(
            f"model files under {path} were altered after registration: sha256 is {actual}, "
            f"registered {expected}; re-register the model or restore its files"
        )


def confine(path: Path | str, roots: Iterable[Path]) -> Path:
    """Return ``path`` fully resolved (symlinks followed) if it lies under one of ``roots``.

    A relative path is taken relative to the first root. Raises PathNotAllowedError (a PermanentJobError and a
    ValueError) for anything outside, including ``..`` tricks and symlinks that point out of the roots.
    """
    root_list = [Path(r).resolve() for r in roots]
    if not root_list:
        raise PathNotAllowedError("no model roots are configured: refusing every path")
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root_list[0] / candidate
    resolved = candidate.resolve()
    if any(resolved.is_relative_to(root) for root in root_list):
        return resolved
    allowed = ", ".join(str(r) for r in root_list)
    raise PathNotAllowedError(f"model path {path} resolves to {resolved}, outside the allowed roots ({allowed})")


def _entries(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``root`` (relative POSIX path, its own lstat), links never followed."""
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as listing:
            for entry in listing:
                info = entry.stat(follow_symlinks=False)
                yield Path(entry.path).relative_to(root).as_posix(), info
                if stat.S_ISDIR(info.st_mode):
                    pending.append(Path(entry.path))


def refuse_links_and_special_files(root: Path) -> None:
    """Raise UnsafeModelDirectory at the first symbolic link or special file (FIFO, device, socket) under
    ``root``: a link could make the store read files outside the directory, a FIFO or device block a copy."""
    for relative, info in _entries(root):
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeModelDirectory(f"{relative} is a symbolic link: a model directory to import must hold none")
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            raise UnsafeModelDirectory(
                f"{relative} is a special file (FIFO, device or socket): a model directory holds only files"
            )


def check_importable(root: Path) -> None:
    """Raise UnsafeModelDirectory unless ``root`` holds only directories and regular files, and its weights are
    safetensors: none in a pickle-based format, and at least one ``*.safetensors`` file."""
    refuse_links_and_special_files(root)
    weights = 0
    for relative, info in _entries(root):
        suffix = Path(relative).suffix.lower()
        if stat.S_ISREG(info.st_mode) and suffix in PICKLE_SUFFIXES:
            raise UnsafeModelDirectory(
                f"{relative} is in a pickle-based format ({suffix}), which can run code when loaded: "
                "lmbatch imports safetensors weights only (save_pretrained(..., safe_serialization=True))"
            )
        weights += suffix == ".safetensors"
    if not weights:
        raise UnsafeModelDirectory("no *.safetensors weights: lmbatch imports safetensors weights only")


def _copy_regular_file(source: str, target: str) -> None:
    # shutil.copytree's copy function: opened without following a link, and without blocking on a FIFO, then
    # copied only if it is a regular file, so nothing swapped in after the check is read.
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as reader:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeModelDirectory(f"{Path(source).name} is not a regular file")
        with open(target, "xb") as writer:
            shutil.copyfileobj(reader, writer, _CHUNK)
    os.chmod(target, stat.S_IMODE(info.st_mode))


def detect_task(config: dict) -> str:
    """The engine task for a transformers ``config.json`` (already parsed), from its architecture names."""
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence-classification"
    return "encoder"


def kinds_for_task(task: str) -> list[str]:
    """The job kinds a model of this task can serve."""
    try:
        return list(_KINDS[task])
    except KeyError:
        raise ValueError(f"unknown model task {task!r}; expected one of {', '.join(TASKS)}") from None


def version_dir(store: Path, name: str, number: int) -> Path:
    """Where version ``number`` of ``name`` lives, absolute: ``store/<name>/<number>/`` for a catalogue name,
    ``store/_tenants/<ns>/<name>/<number>/`` for a tenant's ``ns/name``.

    Tenant versions sit under a prefix no catalogue name can have (a name starts with a letter or digit), so
    tenant ``acme``'s ``acme/2`` never lands inside catalogue model ``acme``'s version 2."""
    root = Path(store).resolve()
    parts = name.split("/")
    if len(parts) > 2 or any(part in ("", ".", "..") or part.startswith((".", "_")) for part in parts):
        raise PathNotAllowedError(f"{name!r} is not a model name that can name a directory in the store")
    relative = Path(TENANT_DIR, *parts) if len(parts) == 2 else Path(name)
    return confine(root / relative / str(number), [root])


@contextmanager
def staged(directory: Path, *, store: Path, name: str, keep_source: bool) -> Iterator[Path]:
    """``directory``, ready to be renamed into ``store`` (see ``move_into_store``).

    With ``keep_source`` it is first copied into a temporary directory inside the store: an import leaves its
    source alone, and the later rename never crosses filesystems. Without, it is handed back as it is (a
    fine-tune's output directory is the worker's to take). Whatever is left of the copy on exit (all of it if
    registering failed) is removed.
    """
    if not keep_source:
        yield directory
        return
    Path(store).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{name.replace('/', '+')}-", dir=store))
    try:
        copy = staging / "model"
        # Links are copied as links (never followed), other files only when they are regular ones, and the copy
        # is checked again: what was checked at the source may have changed since.
        shutil.copytree(directory, copy, symlinks=True, copy_function=_copy_regular_file)
        refuse_links_and_special_files(copy)
        yield copy
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_store(directory: Path, target: Path) -> None:
    """Rename a staged directory to its version's place. Called inside the registering transaction, so a crash
    leaves either nothing registered or a directory that no row names (which the next registration replaces)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # left by a crash between a rename and its commit: no row points at it
        shutil.rmtree(target)
    os.replace(directory, target)


def remove_stored(store: Path, artifact_uri: str) -> None:
    """Delete a version's files if they live in the store. Built-ins and imports live there; a path outside it
    (a version registered in place, under an import root) is never touched."""
    path = Path(artifact_uri)
    if path.resolve().is_relative_to(Path(store).resolve()):
        shutil.rmtree(path, ignore_errors=True)
