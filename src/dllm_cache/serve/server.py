"""The HTTP server around the app: uvicorn, with idle connections closed.

uvicorn closes a keep-alive connection that stays idle after a response, but arms no timer for a
connection that never sends a request: a client could hold sockets open forever. The protocol here
arms the same timer as soon as the connection is made. Malformed HTTP (which never reaches the app)
is refused in OpenAI's error shape too, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_KEEP_ALIVE_S = 5


class IdleClosingH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # data_received cancels it; on_response_complete arms it again for the next request
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def send_400_response(self, msg: str) -> None:
        error = {"message": msg, "type": "invalid_request_error", "param": None, "code": "invalid_http"}
        body = json.dumps({"error": error}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def server_config(
    app: object,
    host: str = "127.0.0.1",
    port: int = 8000,
    keep_alive_s: int = DEFAULT_KEEP_ALIVE_S,
    log_level: str = "warning",
) -> uvicorn.Config:
    """uvicorn's settings for the app; `keep_alive_s`: a connection idle this long is closed."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        http=IdleClosingH11Protocol,
        timeout_keep_alive=keep_alive_s,
        log_level=log_level,
    )
