"""Domain errors with an HTTP meaning, raised by the domain modules of every app and turned into API
responses in one place (registry.exceptions): views do not translate them one by one."""


class NotFound(Exception):
    """Nothing by that id or name; the message says what and what to do."""


class Forbidden(Exception):
    """The token may not change this: it did not create it and is not staff."""


class Conflict(Exception):
    """The request conflicts with the current state (409). ``code`` names the case for machines;
    ``extra`` adds fields to the body ``{"code", "detail", ...}``."""

    code = "conflict"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.extra = extra

    def body(self) -> dict[str, object]:
        return {"code": self.code, "detail": str(self), **self.extra}


class InvalidInput(Exception):
    """Input a domain rule refuses (a quota, say) where only the database can tell: a 400 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
