"""A local HTTP server on 127.0.0.1 that speaks enough of the Anthropic Messages API for tests.

The real `anthropic` client talks to it over a socket. Each POST /v1/messages takes the next scripted
reply (status, text and tool_use blocks, headers, a delay) from a queue; when the queue is empty it asks
`responder(body)`, or answers 200 with `default_text`. Every request is recorded (path, headers, JSON
body) so tests can check what was sent."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    text: str = ""                       # the assistant's text for a 200
    input_tokens: int = 100
    output_tokens: int = 20
    headers: dict = field(default_factory=dict)
    tool_uses: list = field(default_factory=list)   # (name, input) pairs, sent as tool_use blocks after the text
    delay_s: float = 0.0                 # wait this long before answering (client timeouts)


def message_body(reply: Reply, model: str) -> dict:
    content = [{"type": "text", "text": reply.text}] if reply.text or not reply.tool_uses else []
    content += [{"type": "tool_use", "id": f"toolu_test_{i}", "name": name, "input": arguments}
                for i, (name, arguments) in enumerate(reply.tool_uses)]
    return {
        "id": "msg_test", "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": "tool_use" if reply.tool_uses else "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
    }


def error_body(status: int) -> dict:
    kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": f"scripted {status}"}}


class AnthropicTestServer:
    """Context manager: `with AnthropicTestServer() as server: ... server.base_url ...`."""

    def __init__(self, default_text: str = "Look at the failing test first.", responder=None):
        self.default_text = default_text
        self.responder = responder   # body -> Reply, for requests the queue does not script
        self.replies: list[Reply] = []
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server._lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "headers": {k.lower(): v for k, v in self.headers.items()}})
                    if server.replies:
                        reply = server.replies.pop(0)
                    elif server.responder is not None:
                        reply = server.responder(body)
                    else:
                        reply = Reply(text=server.default_text)
                if self.path.rstrip("/") != "/v1/messages":
                    reply = Reply(status=404)
                time.sleep(reply.delay_s)
                payload = message_body(reply, body.get("model", "")) if reply.status == 200 else \
                    error_body(reply.status)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):   # the client timed out and hung up
                    pass

            def log_message(self, *args):  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    def __enter__(self) -> "AnthropicTestServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
