"""Where the registry is and which token to use: arguments first, then ``CONVEYOR_URL`` and
``CONVEYOR_TOKEN``, then the local default (``http://127.0.0.1:8000``, no token)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Config:
    url: str
    token: str | None
    timeout: float = 10.0

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    @property
    def ws_url(self) -> str:
        """The websocket base: ``ws://host:port`` (``wss://`` for https)."""
        if self.url.startswith("https://"):
            return "wss://" + self.url[len("https://") :]
        return "ws://" + self.url[len("http://") :] if self.url.startswith("http://") else self.url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def ws_subprotocols(self) -> list[str]:
        """The websocket handshake offers the token as subprotocol ``token.<key>`` next to ``conveyor.v1``;
        the server answers ``conveyor.v1``, so the token never appears in a URL or an access log."""
        return ["conveyor.v1", f"token.{self.token}"] if self.token else ["conveyor.v1"]


def resolve(url: str | None = None, token: str | None = None, timeout: float = 10.0) -> Config:
    url = (url or os.environ.get("CONVEYOR_URL") or DEFAULT_URL).rstrip("/")
    token = token if token is not None else os.environ.get("CONVEYOR_TOKEN") or None
    return Config(url=url, token=token, timeout=timeout)
