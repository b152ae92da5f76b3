"""Domain errors with an HTTP meaning, raised by the domain modules of every app and turned into API
responses in one place (registry.exceptions): views do not translate them one by one."""


class NotFound(Exception):
    """Nothing by that id or name; the message says what and what to do."""


class Forbidden(Exception):
    """The token may not change this: it did not create it and is not staff."""


class InvalidInput(Exception):
    """Input a domain rule refuses (a quota, say) where only the database can tell: a 400 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
