"""OpenAI-compatible HTTP endpoints (vLLM, llama.cpp's server, hosted APIs) through the `openai` client.

The client retries timeouts, lost connections, 408/409/429 and 5xx answers with its own exponential backoff
(honouring Retry-After) and keeps the connection open between calls. An answer that arrives but cannot be
used (a body that is not JSON, or JSON without the fields the caller needs) is asked again here, after
`backoff` x 2^k seconds. Both kinds of fault draw on one budget: at most `max_retries + 1` requests per call;
after the last one the call fails with a message naming the URL and the last fault. A status the client does not
retry (401, or a 429 whose Retry-After is longer than it waits) fails at once. The API key is read from the
environment variable named in the profile at the first call, so it never lands in parameters, manifests, caches
or logs; without one the client sends the placeholder key "none", which a server without keys ignores. The client also reads openai's own environment variables
(OPENAI_ORG_ID, OPENAI_PROJECT_ID, OPENAI_CUSTOM_HEADERS), which a hosted API may want and a local server ignores.
One `EndpointClient` serves one caller at a time (its request count is per call).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable


class EndpointError(RuntimeError):
    pass


class Malformed(ValueError):
    """Raised by a response check: the answer arrived but is not what the caller needs (asked again)."""


# what a caller's `parse` raises on an answer without the fields it reads (besides Malformed)
UNREADABLE = (Malformed, AttributeError, KeyError, IndexError, TypeError)


@dataclass
class EndpointClient:
    base_url: str
    api_key_env: str | None = None
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    _sent: int = field(default=0, init=False, repr=False)
    _openai: object = field(default=None, init=False, repr=False)

    def _key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EndpointError(f"environment variable {self.api_key_env} (the endpoint's API key) is not set")
        return key

    def _count(self, request) -> None:
        self._sent += 1

    def _client(self):
        """One openai client per endpoint (imported here: a chapter that judges locally never loads it), so its
        connection is kept between calls; every request it sends is counted."""
        if self._openai is None:
            import openai

            key = self._key()
            self._openai = openai.OpenAI(
                base_url=f"{self.base_url.rstrip('/')}/v1", api_key=key or "none", timeout=self.timeout,
                http_client=openai.DefaultHttpxClient(event_hooks={"request": [self._count]}))
        return self._openai

    def call(self, request: Callable[[object], object], parse: Callable[[object], object]):
        """`parse(request(client))`: `request` makes one API call on the openai client it is given, `parse`
        reads the answer and raises Malformed (or fails on a missing field) when it cannot be used."""
        import openai

        url, client = self.base_url.rstrip("/"), self._client()
        budget, self._sent, last, unusable = self.max_retries + 1, 0, "", 0
        while self._sent < budget:
            sent = self._sent
            try:
                answer = request(client.with_options(max_retries=budget - self._sent - 1))
                return parse(answer)
            except openai.APIStatusError as e:
                last, code = f"HTTP {e.status_code}", e.status_code
                # a status the client never retries, or one it declined to (it gave up before the budget)
                if self._sent < budget or not (code in (408, 409, 429) or code >= 500):
                    raise EndpointError(f"{url}: {last}, not retried") from None
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                last = f"no answer ({type(e).__name__})"
            except (json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError, *UNREADABLE) as e:
                if self._sent == sent:   # nothing was sent: a fault of the request itself, not of an answer
                    raise
                last, unusable = f"unusable answer ({type(e).__name__}: {e})", unusable + 1
                if self._sent < budget:
                    time.sleep(self.backoff * 2 ** (unusable - 1))
        raise EndpointError(f"{url}: gave up after {self._sent} tries; last: {last}")
