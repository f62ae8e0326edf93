"""A small client for the Falcon predictor's ``POST /chat``. Import it from a notebook beside it, or copy the file.

    from falcon_client import FalconClient, FalconError

    client = FalconClient.from_env()  # $PREDICTOR_URL (default http://localhost:8080) and $PREDICTOR_API_KEY
    client.wait_until_ready()
    print(client.chat("Write a poem about giraffes", max_new_tokens=40))

Top-level /chat fields (``seed``, ``return_full_text``, ``prefix``, ``handle_long_generation``,
``clean_up_tokenization_spaces``) are keywords; every other keyword goes into ``generate_kwargs``. A refused or
failed request raises ``FalconError`` carrying the server's own message. Only ``requests`` is needed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import requests

DEFAULT_URL = "http://localhost:8080"  # `python -m predictor` on this machine
TOP_LEVEL_FIELDS = ("return_full_text", "clean_up_tokenization_spaces", "prefix", "handle_long_generation", "seed")


class FalconError(Exception):
    """The server refused or failed a request (``status`` is None when it could not be reached at all)."""

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.param = param  # the request field at fault, e.g. "generate_kwargs.top_p"

    def __str__(self) -> str:
        status = f"HTTP {self.status}" if self.status is not None else "no answer"
        return f"{status}: {self.message}"


@dataclass(frozen=True)
class Completion:
    """One /chat answer: the generated texts, the server's ``details`` and how long the client waited for it."""

    texts: list[str]
    details: dict[str, Any]  # prompt_tokens, generated_tokens (per text), finish_reasons, and logprobs when asked
    seconds: float

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def generated_tokens(self) -> int:
        return sum(self.details.get("generated_tokens", ()))

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class FalconClient:
    url: str = DEFAULT_URL
    api_key: str | None = None  # sent as "Authorization: Bearer <key>" when the server was started with one
    timeout_s: float = 300.0  # per request: long generations on a busy server take a while

    @classmethod
    def from_env(cls) -> FalconClient:
        """The endpoint in $PREDICTOR_URL (else a local ``python -m predictor``), the key in $PREDICTOR_API_KEY."""
        return cls(url=os.environ.get("PREDICTOR_URL") or DEFAULT_URL,
                   api_key=os.environ.get("PREDICTOR_API_KEY") or None)

    def chat(self, prompt: str, **options: Any) -> str | list[str]:
        """The generated text, or a list of texts when ``num_return_sequences`` > 1 (the server's ``Result``)."""
        texts = self.generate(prompt, **options).texts
        return texts[0] if len(texts) == 1 else texts

    def generate(self, prompt: str, **options: Any) -> Completion:
        """Like ``chat``, with the server's ``details`` and the request's wall-clock time."""
        started = time.perf_counter()
        body = self.post_chat(to_payload(prompt, **options))
        seconds = time.perf_counter() - started
        result = body["Result"]
        return Completion(texts=result if isinstance(result, list) else [result], details=body.get("details", {}),
                          seconds=seconds)

    def post_chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send a /chat payload as it is and return the decoded JSON response."""
        return self._request("POST", "/chat", json=payload).json()

    @property
    def auth_headers(self) -> dict[str, str]:
        """The headers that authenticate a request, for calls made without this client."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def is_ready(self) -> bool:
        """Whether the model is loaded and taking requests (``GET /health`` answers 200)."""
        try:
            return requests.get(self._url("/health"), headers=self.auth_headers, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_until_ready(self, deadline_s: float = 300.0, poll_s: float = 1.0) -> None:
        """Poll readiness until the model serves; a large model can take minutes to load after the port opens."""
        deadline = time.monotonic() + deadline_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} was not ready within {deadline_s:.0f} s: is the server running, and "
                                   "is PREDICTOR_URL right?")
            time.sleep(poll_s)

    def models(self) -> list[str]:
        """The names of the models the server serves (KServe's ``GET /v1/models``)."""
        return self._request("GET", "/v1/models").json()["models"]

    def _url(self, path: str) -> str:
        return self.url.rstrip("/") + path

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = requests.request(method, self._url(path), headers=self.auth_headers, timeout=self.timeout_s,
                                        **kwargs)
        except requests.RequestException as exc:
            # `from None`: the user wants to know the server was unreachable, not urllib3's call stack.
            raise FalconError(f"cannot reach {self.url}: {exc}") from None
        if not response.ok:
            raise to_falcon_error(response)
        return response


def to_payload(prompt: str, **options: Any) -> dict[str, Any]:
    """A /chat payload: top-level fields as given, every other option under ``generate_kwargs``."""
    payload: dict[str, Any] = {"prompt": prompt}
    payload.update({name: options.pop(name) for name in TOP_LEVEL_FIELDS if name in options})
    if options:
        payload["generate_kwargs"] = options
    return payload


def to_falcon_error(response: requests.Response) -> FalconError:
    """The server's error body (``{"detail", "error", "error_type", "param"}``) as a ``FalconError``."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    message = body.get("error") or body.get("detail")
    if not isinstance(message, str):  # a proxy's HTML page, or a framework's structured detail
        message = str(message) if message else (response.text.strip()[:500] or response.reason)
    return FalconError(message, status=response.status_code, error_type=body.get("error_type"),
                       param=body.get("param"))
