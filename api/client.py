"""A small HTTP client for lmbatch's API: what the ``lmbatch`` CLI calls, and usable from Python as is.

Every failure is one of these, and its ``str()`` is one line a person can act on:

    ClientError                 base class: catch this
    ├── ApiResponseError        the API answered 4xx/5xx: ``status``, ``message``, ``param``
    └── ApiUnreachable          no answer at all: connection refused, unknown host, timeout

It imports neither the server code nor torch (only db/names.py, the shared words, which is plain Python): a
laptop needs only httpx to drive a remote lmbatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from db.names import TERMINAL_JOB_STATES

DEFAULT_URL = "http://127.0.0.1:8000"
# The states a job ends in, for callers that poll one (the CLI's --wait). db/names.py is plain Python, so
# importing it keeps this client free of the server's dependencies.
TERMINAL_STATES = TERMINAL_JOB_STATES


class ClientError(Exception):
    """A request that did not give what was asked; the message is one line."""


class ApiResponseError(ClientError):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        where = f" ({param})" if param and not message.startswith(f"{param}:") else ""
        super().__init__(f"HTTP {status}{where}: {message}")
        self.status = status
        self.message = message
        self.param = param


class ApiUnreachable(ClientError):
    pass


def _in_path(segment: str) -> str:
    """A name as one URL path segment: '/', '@', ':' and the rest percent-encoded, as the openai SDK sends them
    (the server decodes them, and its model routes take a name holding '/')."""
    return quote(segment, safe="")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_from(response: httpx.Response) -> ApiResponseError:
    """The API's ``{"error": {"message", "param"}}`` body as an exception; any other body, its first words."""
    response.read()
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return ApiResponseError(response.status_code, _one_line(str(error.get("message") or "")), error.get("param"))
    if isinstance(body, dict) and "detail" in body:  # a plain FastAPI/Starlette error
        return ApiResponseError(response.status_code, _one_line(str(body["detail"])))
    return ApiResponseError(response.status_code, _one_line(response.text) or response.reason_phrase or "error")


class Client:
    """One API base URL and key; ``with Client(...) as client:`` closes the connection pool."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------------------------------- plumbing

    @contextmanager
    def _send(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """The response, streamed (the body is read by the caller), after turning failures into ClientError."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    raise error_from(response)
                yield response
        except httpx.TimeoutException as error:
            raise ApiUnreachable(f"no answer from {self.base_url} in time ({type(error).__name__})") from error
        except httpx.TransportError as error:
            reason = _one_line(str(error)) or type(error).__name__
            raise ApiUnreachable(f"cannot reach the lmbatch API at {self.base_url}: {reason}") from error

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        with self._send(method, path, **kwargs) as response:
            response.read()
        try:
            body = response.json()
        except ValueError as error:
            raise ClientError(f"{method} {path}: the answer is not JSON") from error
        if not isinstance(body, dict):
            raise ClientError(f"{method} {path}: expected a JSON object")
        return body

    # ------------------------------------------------------------------------------------------- files

    def upload_file(self, content: IO[bytes], *, filename: str, purpose: str) -> dict[str, Any]:
        """``POST /v1/files``: purpose ``jobs`` (inputs of a job) or ``fine-tune`` (training data)."""
        files = {"file": (filename, content, "application/jsonl")}
        return self._json("POST", "/v1/files", files=files, data={"purpose": purpose})

    # -------------------------------------------------------------------------------------------- jobs

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/jobs", json=body)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        after: str | None = None,
        limit: int = 20,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """A page of jobs; `tenant` (admin keys only) narrows an admin's view of every tenant's to one."""
        query = {k: v for k, v in {"status": status, "kind": kind, "after": after, "tenant": tenant}.items() if v}
        return self._json("GET", "/v1/jobs", params={**query, "limit": limit})

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def job_events(self, job_id: str, *, after: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit})

    def write_results(self, job_id: str, out: IO[bytes]) -> int:
        """Stream ``results.jsonl`` into ``out`` without holding it in memory; returns the number of lines."""
        lines = 0
        with self._send("GET", f"/v1/jobs/{job_id}/results.jsonl") as response:
            try:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    lines += chunk.count(b"\n")
            except httpx.TransportError as error:  # the server went away mid-stream: the file is incomplete
                raise ApiUnreachable(f"the results stream of {job_id} broke off after {lines} lines") from error
        return lines

    def save_results(self, job_id: str, path: Path) -> int:
        """Write the results to ``path`` atomically: a broken stream never leaves a half file under its name."""
        partial = path.with_name(f".{path.name}.partial")
        try:
            with partial.open("wb") as out:
                lines = self.write_results(job_id, out)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return lines

    # ------------------------------------------------------------------------------- models and workers

    def list_models(self) -> dict[str, Any]:
        return self._json("GET", "/v1/models")

    def get_model(self, name: str) -> dict[str, Any]:
        """A model by name (`acme/support-bot`) with its versions, or one version by ref (`acme/support-bot@2`)."""
        return self._json("GET", f"/v1/models/{_in_path(name)}")

    def quantize_model(self, ref: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/models/{ref}/quantize``: the job that makes the int8 version."""
        return self._json("POST", f"/v1/models/{_in_path(ref)}/quantize", json=body)

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        return self._json("PUT", f"/v1/models/{_in_path(name)}/aliases/{_in_path(alias)}", json={"version": version})

    def delete_model_version(self, name: str, version: int) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/models/{_in_path(name)}/versions/{version}")

    def usage(
        self,
        *,
        start_time: int | None = None,
        end_time: int | None = None,
        group_by: str | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """The usage report of jobs that finished in [start_time, end_time) (epoch seconds; the API's defaults:
        the last 30 days), grouped by `model`, `kind` or `day`; `tenant` (admin keys only) for one tenant's."""
        query = {"start_time": start_time, "end_time": end_time, "group_by": group_by, "tenant": tenant}
        return self._json("GET", "/v1/usage", params={k: v for k, v in query.items() if v is not None})

    def list_workers(self) -> dict[str, Any]:
        return self._json("GET", "/v1/workers")
