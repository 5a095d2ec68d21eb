"""A small client for OpenAI-compatible HTTP endpoints (vLLM, llama.cpp's server, hosted APIs).

Timeouts, 429, 5xx and malformed bodies are retried with exponential backoff; after the last try the call
fails with a message naming the URL and the last fault. The API key is read from the environment variable
named in the profile at call time, so it never lands in parameters, manifests, caches or logs.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    pass


class Malformed(ValueError):
    """Raised by a response check: the body is JSON but not what the caller needs (retried)."""


@dataclass
class EndpointClient:
    base_url: str
    api_key_env: str | None = None
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EndpointError(f"environment variable {self.api_key_env} (the endpoint's API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def post(self, path: str, body: dict, parse: Callable[[dict], object]):
        """POST `body` as JSON and return `parse(answer)`; `parse` raises Malformed for an unusable answer."""
        url = self.base_url.rstrip("/") + path
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=self._headers())
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode())
                if not isinstance(data, dict):
                    raise Malformed("not a JSON object")
                return parse(data)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    raise EndpointError(f"{url}: {last}, not retried") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"no answer ({getattr(e, 'reason', e)})"
            except (json.JSONDecodeError, UnicodeDecodeError):
                last = "malformed answer (not JSON)"
            except (Malformed, KeyError, IndexError, TypeError) as e:
                last = f"malformed answer ({e})"
        raise EndpointError(f"{url}: gave up after {self.max_retries + 1} tries; last: {last}")
