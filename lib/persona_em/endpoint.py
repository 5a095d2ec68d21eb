"""OpenAI-compatible HTTP endpoints (vLLM, llama.cpp's server, hosted APIs) through the `openai` client.

The client retries timeouts, lost connections, 408/409/429 and 5xx answers with its own exponential backoff
(honouring Retry-After) and keeps the connection open between calls. An answer that arrives but cannot be
used (a body that is not JSON, or JSON without the fields the caller needs) is asked again here, after
`backoff` x 2^k seconds. Both kinds of fault draw on one budget: at most `max_retries + 1` requests per call;
after the last one the call fails with a message naming the URL and the last fault. The API key is read from
the environment variable named in the profile at the first call, so it never lands in parameters, manifests,
caches or logs.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
import openai


class EndpointError(RuntimeError):
    pass


class Malformed(ValueError):
    """Raised by a response check: the answer arrived but is not what the caller needs (asked again)."""


UNUSABLE = (Malformed, json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError,
            AttributeError, KeyError, IndexError, TypeError)


@dataclass
class EndpointClient:
    base_url: str
    api_key_env: str | None = None
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    _sent: int = field(default=0, init=False, repr=False)
    _openai: openai.OpenAI | None = field(default=None, init=False, repr=False)

    def _key(self) -> str:
        if not self.api_key_env:
            return "none"   # a local server that asks for no key; the client needs a string
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EndpointError(f"environment variable {self.api_key_env} (the endpoint's API key) is not set")
        return key

    def _count(self, request) -> None:
        self._sent += 1

    def call(self, request: Callable[[openai.OpenAI], object], parse: Callable[[object], object]):
        """`parse(request(client))`: `request` makes one API call on the openai client it is given, `parse`
        reads the answer and raises Malformed (or fails on a missing field) when it cannot be used."""
        url = self.base_url.rstrip("/")
        if self._openai is None:   # one client per endpoint, so its connection is kept between calls
            self._openai = openai.OpenAI(base_url=f"{url}/v1", api_key=self._key(), timeout=self.timeout,
                                         http_client=httpx.Client(event_hooks={"request": [self._count]}))
        budget, self._sent, last, unusable = self.max_retries + 1, 0, "", 0
        while self._sent < budget:
            try:
                return parse(request(self._openai.with_options(max_retries=budget - self._sent - 1)))
            except openai.APIStatusError as e:
                last = f"HTTP {e.status_code}"
                if not _retried(e.status_code):
                    raise EndpointError(f"{url}: {last}, not retried") from None
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                last = f"no answer ({type(e).__name__})"
            except UNUSABLE as e:
                last, unusable = f"unusable answer ({type(e).__name__}: {e})", unusable + 1
                if self._sent < budget:
                    time.sleep(self.backoff * 2 ** (unusable - 1))
        raise EndpointError(f"{url}: gave up after {self._sent} tries; last: {last}")


def _retried(status: int) -> bool:
    """The statuses the openai client asks again on (what reaches us with one of these spent the budget)."""
    return status in (408, 409, 429) or status >= 500
