"""The console's refusals, each shown as an HTML page with its status (never the API's JSON, never a traceback).

    ConsoleError          → the error page with its status and message
    ├── PageNotFound      404 "Not found" (also another tenant's job: its existence is not revealed)
    ├── CsrfRefused       403: the form did not carry this session's CSRF token
    └── SignInRequired    no live session: a page 303s to the sign-in page; an htmx request gets 401

api/console/error_pages.py renders them, and the API's own errors met on a /ui address.
"""

from __future__ import annotations

CSRF_MESSAGE = "This form was not sent by this console (CSRF check failed). Reload the page and try again."


class ConsoleError(Exception):
    status_code = 400
    title = "Something went wrong"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class PageNotFound(ConsoleError):
    status_code = 404
    title = "Not found"


class CsrfRefused(ConsoleError):
    status_code = 403
    title = "Refused"

    def __init__(self) -> None:
        super().__init__(CSRF_MESSAGE)


class SignInRequired(ConsoleError):
    status_code = 401
    title = "Sign in"

    def __init__(self, sign_in_url: str) -> None:
        super().__init__("Your console session has ended: sign in again.")
        self.sign_in_url = sign_in_url
