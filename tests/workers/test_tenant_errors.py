"""What a tenant reads when a shard fails (workers/shards/recording.py): the failure kind and a short sentence,
never a traceback, SQL, parameters, a URL or a server path."""

from __future__ import annotations

from sqlalchemy.exc import DataError

from workers.errors import ModelIntegrityError, PermanentJobError
from workers.shards.recording import MESSAGE_CHARS, public_message, tenant_error


def test_a_job_error_keeps_its_kind_and_sentence_without_paths_or_urls() -> None:
    error = ModelIntegrityError(
        "model acme/bot@2: files under /srv/lmbatch/models/acme/bot/2 changed; "
        "see postgresql://lmbatch:s3cret@db:5432/lmbatch and ./var/finetune/job-1"
    )
    shown = tenant_error(error)
    assert shown["code"] == "model_integrity"
    assert shown["message"] == "model acme/bot@2: files under <path> changed; see <url> and <path>"


def test_a_database_error_names_its_kind_only() -> None:
    error = DataError("INSERT INTO item_results (custom_id) VALUES (%(custom_id)s)", {"custom_id": "x"}, Exception())
    assert tenant_error(error) == {
        "code": "database_error",
        "message": "a database operation failed; the worker's log has the details",
    }


def test_any_other_error_names_its_class_only() -> None:
    shown = tenant_error(KeyError("/etc/passwd"))
    assert shown["code"] == "internal_error" and "KeyError" in shown["message"] and "passwd" not in shown["message"]


def test_a_long_message_is_cut() -> None:
    shown = tenant_error(PermanentJobError("bad " * 1000))
    assert len(shown["message"]) == MESSAGE_CHARS and shown["message"].endswith("…")
    assert public_message("labels a/b and c/d, ratio 1/2") == "labels a/b and c/d, ratio 1/2"
