"""Request limits: request bodies are capped before they are buffered, and an upload's bytes are read up to
a limit."""

from __future__ import annotations

from fastapi import HTTPException, UploadFile
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small form fields around the file


class BodySizeLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413, before they are buffered.

    A declared ``Content-Length`` is checked up front; a streamed body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return f"request body is {size} bytes, over the limit of {self.max_bytes:,}; send a smaller image"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        # bytes.isdigit() is ASCII-only, so this is a strict parse of the header
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._message(f"{int(declared):,}")}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI re-raises an HTTPException met while reading the body as this response.
                raise HTTPException(413, self._message(f"over {received:,}"))
            return message

        await self.app(scope, counted_receive, send)


def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The uploaded file's bytes; over ``max_bytes`` is a 413."""
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"{file.filename or 'upload'}: over the limit of {max_bytes:,} bytes")
    return data
