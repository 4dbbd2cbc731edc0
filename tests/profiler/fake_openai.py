"""A minimal streaming OpenAI-compatible server for http-backend tests (stdlib only, in a thread).

Each completion streams ``max_tokens`` tokens in chunks of ``tokens_per_chunk`` (as a speculating
server does), then a usage chunk; ``/metrics`` exposes vLLM-named counters that advance with every
request: one draft per chunk after the first, ``tokens_per_chunk - 1`` of its tokens accepted. With
``k=0`` it exports no spec-decode counters (a server without speculation, as vLLM does); ``kv_blocks``
adds vLLM's ``vllm:cache_config_info``; ``/v1/models`` names ``root``, the path it was "started" from.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    def __init__(
        self,
        tokens_per_chunk: int = 1,
        chunk_delay_s: float = 0.002,
        k: int = 4,
        fail_every: int = 0,
        kv_blocks: int | None = None,
        root: str = "/models/fake",
    ):
        self.kv_blocks, self.root = kv_blocks, root
        self.tokens_per_chunk, self.chunk_delay_s, self.k, self.fail_every = (
            tokens_per_chunk,
            chunk_delay_s,
            k,
            fail_every,
        )
        self.lock = threading.Lock()
        self.requests = 0
        self.counters = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "generation": 0}
        self.per_pos = [0] * k
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body = outer.metrics().encode()
                elif self.path == "/v1/models":
                    body = json.dumps({"data": [{"id": "fake", "root": outer.root}]}).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":  # vLLM's tokenizer endpoint: one token per character here
                    msg = json.dumps({"tokens": list(range(len(body.get("prompt", ""))))}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                with outer.lock:
                    outer.requests += 1
                    n = outer.requests
                if outer.fail_every and n % outer.fail_every == 0:
                    msg = b'{"error": "boom"}'
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                left, first = int(body["max_tokens"]), True
                while left > 0:
                    take = 1 if first else min(outer.tokens_per_chunk, left)
                    time.sleep(outer.chunk_delay_s)
                    outer.count(take, first)
                    chunk = {"choices": [{"index": 0, "text": " x" * take}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    left -= take
                    first = False
                usage = {
                    "choices": [],
                    "usage": {"prompt_tokens": 7, "completion_tokens": int(body["max_tokens"])},
                }
                self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def count(self, tokens: int, first: bool) -> None:
        with self.lock:
            self.counters["generation"] += tokens
            if not first and self.k:
                self.counters["drafts"] += 1
                self.counters["draft_tokens"] += self.k
                self.counters["accepted"] += tokens - 1
                for i in range(tokens - 1):
                    self.per_pos[i] += 1

    def metrics(self) -> str:
        c = self.counters
        lines = [
            "# TYPE vllm:generation_tokens counter",
            f'vllm:generation_tokens_total{{model_name="fake"}} {c["generation"]}',
        ]
        if self.kv_blocks is not None:
            lines += [
                "# TYPE vllm:cache_config_info gauge",
                f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="{self.kv_blocks}",engine="0"}} 1.0',
            ]
        if self.k == 0:
            return "\n".join(lines) + "\n"
        lines += [
            "# TYPE vllm:spec_decode_num_drafts counter",
            f'vllm:spec_decode_num_drafts_total{{model_name="fake"}} {c["drafts"]}',
            "# TYPE vllm:spec_decode_num_draft_tokens counter",
            f'vllm:spec_decode_num_draft_tokens_total{{model_name="fake"}} {c["draft_tokens"]}',
            "# TYPE vllm:spec_decode_num_accepted_tokens counter",
            f'vllm:spec_decode_num_accepted_tokens_total{{model_name="fake"}} {c["accepted"]}',
            "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter",
        ]
        lines += [
            f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="fake",position="{i}"}} {v}'
            for i, v in enumerate(self.per_pos)
        ]
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
