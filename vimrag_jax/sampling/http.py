"""What the server backends share: JSON over HTTP, a pool of servers, a prompt's media, checks.

`post_json` / `get_json` send one request with retries: connection errors, timeouts, HTTP 429 and
5xx are retried with exponential backoff, then `GenerationError` names the URL and the last
cause; any other HTTP error and a body that is not JSON fail at once. Standard library only.

`ServerPool` spreads requests over ``rollout.server_url`` (one URL or several): each request goes
to the server with the fewest requests in flight among those serving the policy version the
worker tags its rollouts with (ties: round-robin). A server whose reload failed is left out until
a later reload brings it to the worker's version, so a rollout is never labelled with a version
its server does not hold.

Failover: a request whose server stays unreachable through its retries (connection errors,
timeouts, 429, 5xx: `ServerUnavailable`) moves to the least-loaded other server of the same
version, each server tried once with its full retry budget; only when every one of them failed
does `GenerationError` name them all with their causes. A server that failed is put on a
cooldown (``ServerPool.cooldown_s``): while it lasts it gets requests only when no other server
of the version is left, and its first success ends it. ``ServerPool.failures`` counts the
failed tries per server and ``ServerSampler.failovers`` the requests moved; the rollout worker
logs both. Answers that arrive but are wrong (not JSON, 4xx, a malformed or truncated
completion, another weight version) fail at once: they are not a server being down.

`ServerVisuals` is the server backends' ``visual_patches``: where the embedded sampler gets
processor patches, a server gets the pictures themselves. For each prompt it groups the visual
references (``data.vision.group_refs``: one image per picture reference, one video per run of
frames of one item) and encodes every picture and frame, resized to the size the memory budget
gave it with the resize the learner uses (``data.vision.resize_image``, PIL bicubic), as a PNG
``data:`` URL: lossless, so the server decodes exactly the pixels the learner rebuilds.

`ServerSampler` is the base of the SGLang and vLLM backends: the embedded sampler's ``generate``
call shape, one request per prompt (so the pool can balance them and, where the server takes a
seed, each prompt has its own), ``rollout.max_inflight`` requests at once, and the
weight-version bookkeeping of `sync_weights`.
"""

from __future__ import annotations

import base64
import collections
import http.client
import io
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vimrag_jax.sampling.sampler import Completion

_MAX_BACKOFF_S = 30.0
_ERROR_BODY_CHARS = 300


class GenerationError(RuntimeError):
    """A request to a generation server failed for good, or its response was unusable."""


class VersionChanged(GenerationError):
    """A server answered with weights of another policy version than the worker tags with."""


class ServerUnavailable(GenerationError):
    """A server stayed unreachable or overloaded through every retry (connection error,
    timeout, HTTP 429 or 5xx): another server may still answer the request."""


def _retryable_status(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


def _excerpt(data: bytes) -> str:
    text = data[:_ERROR_BODY_CHARS].decode("utf-8", "replace")
    return text + ("…" if len(data) > _ERROR_BODY_CHARS else "")


def request_json(
    method: str,
    url: str,
    payload: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 60.0,
    max_retries: int = 3,
    backoff_s: float = 0.5,
    api_key: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Sends ``payload`` (JSON; None: no body) with ``method`` and returns the decoded response.

    Connection errors, timeouts (``timeout_s`` per socket operation), HTTP 429 and 5xx are
    retried up to ``max_retries`` times, waiting ``backoff_s · 2^attempt`` seconds (at most 30 s)
    between tries. Raises `ServerUnavailable` naming ``url`` and the cause after the last try,
    `GenerationError` at once on any other HTTP error status and when the body of a success is
    not JSON.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if backoff_s < 0:
        raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
    body = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    cause = "no attempt made"
    for attempt in range(max_retries + 1):
        if attempt:
            sleep(min(backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                data = response.read()
        except urllib.error.HTTPError as error:
            detail = _excerpt(error.read() or b"")
            cause = f"HTTP {error.code}: {detail}"
            if not _retryable_status(error.code):
                raise GenerationError(f"{method} {url} failed with {cause}") from error
            continue
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timeout, cut
            reason = getattr(error, "reason", error)
            cause = f"{type(reason).__name__}: {reason}"
            continue
        if not data.strip():
            return None  # e.g. vLLM's bodiless 200s
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise GenerationError(
                f"{method} {url} returned a body that is not JSON ({error}): {_excerpt(data)}"
            ) from error
    raise ServerUnavailable(
        f"{method} {url} failed after {max_retries + 1} attempts; last: {cause}"
    )


def post_json(url: str, payload: Mapping[str, Any], **transport: Any) -> Any:
    """POSTs ``payload`` as JSON (`request_json`; an empty body comes back as None)."""
    return request_json("POST", url, payload, **transport)


def get_json(url: str, **transport: Any) -> Any:
    """GETs ``url`` and decodes its JSON body (`request_json`)."""
    return request_json("GET", url, None, **transport)


# --- servers --------------------------------------------------------------------------------


def server_urls(value: str | Sequence[str]) -> list[str]:
    """``rollout.server_url`` as a list: one URL, several separated by commas or spaces, or a
    list. ValueError for none, or one that is not http(s)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    urls = [str(u).strip().rstrip("/") for u in items if str(u).strip()]
    if not urls:
        raise ValueError("rollout.server_url names no server")
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise ValueError(f"server URLs must start with http:// or https://, got {bad}")
    if len(set(urls)) != len(urls):
        raise ValueError(f"rollout.server_url lists a server twice: {urls}")
    return urls


class ServerPool:
    """Least-loaded choice among the servers that serve a given version, with a cooldown for
    servers that just failed (see the module docstring). ``versions[url]`` is the policy
    version a server is known to serve (None: unknown, e.g. after a failed reload);
    ``failures[url]`` counts its failed tries."""

    def __init__(
        self,
        urls: Sequence[str],
        version: int | None = 0,
        *,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.urls = list(urls)
        self.versions: dict[str, int | None] = {u: version for u in self.urls}
        self.failures = dict.fromkeys(self.urls, 0)
        self.cooldown_s = float(cooldown_s)
        self._cool_until = dict.fromkeys(self.urls, -math.inf)
        self._clock = clock
        self._inflight = dict.fromkeys(self.urls, 0)
        self._lock = threading.Lock()
        self._turn = 0

    def acquire(self, version: int | None, exclude: Sequence[str] = ()) -> str:
        """Reserves the best server serving ``version`` and not in ``exclude`` (out of
        cooldown first, then fewest in flight, then round-robin); release it with `release`.
        GenerationError when there is none."""
        with self._lock:
            serving = [u for u in self.urls if self.versions[u] == version]
            usable = [u for u in serving if u not in exclude]
            if not usable:
                known = {u: self.versions[u] for u in self.urls}
                if serving:
                    raise GenerationError(f"every server of policy version {version} was tried")
                raise GenerationError(
                    f"no server serves policy version {version} (servers: {known}); a weight "
                    "reload failed, see the worker log"
                )
            n, now = len(self.urls), self._clock()

            def rank(u: str) -> tuple[bool, int, int]:
                cooling = self._cool_until[u] > now
                return cooling, self._inflight[u], (self.urls.index(u) - self._turn) % n

            url = min(usable, key=rank)
            self._turn = (self.urls.index(url) + 1) % n
            self._inflight[url] += 1
            return url

    def release(self, url: str, *, ok: bool | None = None) -> None:
        """Frees ``url``'s slot; ``ok=False`` counts a failure and starts its cooldown,
        ``ok=True`` ends a cooldown."""
        with self._lock:
            self._inflight[url] -= 1
            if ok is False:
                self.failures[url] += 1
                self._cool_until[url] = self._clock() + self.cooldown_s
            elif ok:
                self._cool_until[url] = -math.inf

    def cooling(self) -> list[str]:
        """The servers whose cooldown has not run out."""
        now = self._clock()
        return [u for u in self.urls if self._cool_until[u] > now]


# --- a prompt's pictures and frames ---------------------------------------------------------


@dataclass(frozen=True)
class Media:
    """One picture or video of a prompt, in placeholder order: ``urls`` holds one PNG data URL
    (a picture) or one per frame fed to the vision tower (a video), each at ``height × width``;
    ``refs`` are the prompt's visual-reference rows it covers."""

    modality: str
    urls: tuple[str, ...]
    height: int
    width: int
    refs: tuple[tuple[int, int, int, int], ...]


def png_data_url(image: np.ndarray) -> str:
    """A ``data:image/png;base64,`` URL of uint8[H, W, 3] pixels (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_data_url(url: str) -> np.ndarray:
    """uint8[H, W, 3] pixels of a base64 image data URL (the inverse of `png_data_url`)."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError(f"not a base64 data URL: {url[:40]!r}")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        return np.asarray(image.convert("RGB"))


class ServerVisuals:
    """A server backend's ``visual_patches``: ``prompt_inputs(refs)`` gives ``{"media": [Media,
    ...]}`` in placeholder order (see the module docstring). ``load_visual(item, frame)`` reads
    the corpus, ``modality_of(item)`` names an item's modality; encoded frames are cached."""

    def __init__(self, load_visual: Callable, modality_of: Callable, *, cache_size: int = 512):
        self._load = load_visual
        self._modality_of = modality_of
        self._cache: collections.OrderedDict[tuple[int, int, int, int], str] = (
            collections.OrderedDict()
        )
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_store(cls, store: Any) -> ServerVisuals:
        """Over a ``retrieval.corpus.CorpusStore``."""
        return cls(store.load_visual, lambda item: store.item(item).modality)

    def _url(self, ref: tuple[int, int, int, int]) -> str:
        from vimrag_jax.data.vision import resize_image

        with self._lock:
            if ref in self._cache:
                self._cache.move_to_end(ref)
                return self._cache[ref]
        item, frame, height, width = ref
        url = png_data_url(resize_image(np.asarray(self._load(item, frame)), height, width))
        with self._lock:
            self._cache[ref] = url
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return url

    def prompt_inputs(self, refs: np.ndarray) -> dict[str, list[Media]]:
        """The prompt's pictures and videos as `Media`, in placeholder order."""
        from vimrag_jax.data.vision import group_refs

        out = []
        for modality, rows in group_refs(np.asarray(refs), self._modality_of):
            keys = tuple(tuple(int(v) for v in row) for row in rows)
            height, width = keys[0][2], keys[0][3]
            urls = tuple(self._url(key) for key in keys)
            out.append(Media(modality, urls, height, width, keys))
        return {"media": out}


def prompt_media(inputs: Mapping[str, Any] | None) -> list[Media]:
    """The `Media` list of one prompt's ``prefill_inputs`` entry (none for a text prompt)."""
    if not inputs:
        return []
    media = inputs.get("media")
    if not isinstance(media, list) or not all(isinstance(m, Media) for m in media):
        raise GenerationError(
            "a server backend needs ServerVisuals prefill inputs ({'media': [Media, ...]}), got "
            f"keys {sorted(inputs)}"
        )
    return media


# --- response checks ------------------------------------------------------------------------


def check_token_id(value: Any, where: str) -> int:
    """A sampled id: a non-negative int (GenerationError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GenerationError(f"{where}: a token id is not a non-negative int ({value!r:.60})")
    return value


def check_logprob(value: Any, where: str) -> float:
    """A sampled token's log-prob: a finite number <= 0 (GenerationError otherwise)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value > 1e-4
    ):
        raise GenerationError(f"{where}: a token log-prob is not a finite number <= 0 ({value!r})")
    return float(min(value, 0.0))


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, greedy: bool) -> None:
    """ValueError for settings no server can honour."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or greedy=True), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@dataclass(frozen=True)
class Request:
    """One prompt's generation request, as a backend's `ServerSampler._complete` gets it."""

    prompt: list[int]
    media: list[Media]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_token_ids: list[int]
    stop_strings: list[str]
    seed: int | None


class ServerSampler:
    """Base of the server backends (see the module docstring).

    Args:
      urls: the servers (`server_urls`).
      max_inflight: requests in flight at once from this worker.
      timeout_s, max_retries, backoff_s, api_key: transport settings (`request_json`).

    ``policy_version`` is the version the worker tags rollouts with; the pool uses only servers
    known to serve it. ``reload_failures`` counts servers that failed a reload, ``failovers``
    requests answered by another server after theirs stayed unavailable (`ServerPool.failures`:
    the failed tries per server).
    """

    #: The agent loop hands each prompt's visuals (built by `visuals`) to `generate`.
    takes_prefill_inputs = True
    name = "server"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        max_inflight: int = 8,
        timeout_s: float = 300.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        api_key: str | None = None,
    ):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.urls = server_urls(urls)
        self.pool = ServerPool(self.urls, version=0)
        self.policy_version = 0
        self.reload_failures = 0
        self.reloads = 0
        self.failovers = 0
        self._count_lock = threading.Lock()
        self.last_reload_error = ""
        self.max_inflight = int(max_inflight)
        self.transport = dict(
            timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, api_key=api_key
        )
        self._executor: ThreadPoolExecutor | None = None

    def visuals(self, store: Any) -> ServerVisuals:
        """The ``visual_patches`` the agent loop should build this backend's inputs with."""
        return ServerVisuals.from_store(store)

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        stop_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        seed: int | None = None,
        prefill_inputs: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[Completion]:
        """One `Completion` per prompt (token ids), in prompt order; prompt ``i`` gets seed
        ``seed + i`` (where the backend sends one). ``greedy`` sends temperature 0. Every
        response is checked whole before any completion is returned: one bad answer fails the
        call (`GenerationError`)."""
        check_sampling(max_new_tokens, temperature, top_p, greedy)
        batch = [[int(t) for t in p] for p in prompts]
        if any(not p for p in batch):
            raise ValueError("every prompt needs at least one token")
        if prefill_inputs is not None and len(prefill_inputs) != len(batch):
            raise ValueError(f"{len(prefill_inputs)} prefill inputs for {len(batch)} prompts")
        requests = [
            Request(
                prompt=prompt,
                media=prompt_media(None if prefill_inputs is None else prefill_inputs[i]),
                max_new_tokens=int(max_new_tokens),
                temperature=0.0 if greedy else float(temperature),
                top_p=1.0 if greedy else float(top_p),
                stop_token_ids=[int(t) for t in stop_token_ids],
                stop_strings=list(stop_strings),
                seed=None if seed is None else (int(seed) + i) % 2**31,
            )
            for i, prompt in enumerate(batch)
        ]
        version = self.policy_version
        if len(requests) == 1 or self.max_inflight == 1:
            return [self._run(r, version) for r in requests]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.max_inflight, thread_name_prefix=self.name)
        return list(self._executor.map(lambda r: self._run(r, version), requests))

    def _run(self, request: Request, version: int) -> Completion:
        """``request`` on the best server of ``version``, failing over to the others while a
        server stays unavailable (see the module docstring)."""
        tried: list[str] = []
        causes: list[str] = []
        while True:
            try:
                url = self.pool.acquire(version, exclude=tried)
            except GenerationError as error:
                if not tried:
                    raise
                raise GenerationError(
                    f"{self.name}: all {len(tried)} server(s) of policy version {version} failed "
                    f"this request ({', '.join(tried)}): " + "; ".join(causes)
                ) from error
            try:
                completion = self._complete(url, request)
            except ServerUnavailable as error:
                self.pool.release(url, ok=False)
                tried.append(url)
                causes.append(str(error))
                continue
            except BaseException:
                self.pool.release(url)
                raise
            self.pool.release(url, ok=True)
            break
        if tried:
            with self._count_lock:
                self.failovers += 1
        if len(completion.tokens) > request.max_new_tokens:
            raise GenerationError(
                f"{self.name} {url}: {len(completion.tokens)} tokens for max_new_tokens="
                f"{request.max_new_tokens}"
            )
        return completion

    def _complete(self, url: str, request: Request) -> Completion:
        """One prompt's request to ``url`` and its checked answer (each backend's own)."""
        raise NotImplementedError

    # -- weights ---------------------------------------------------------------------------

    def sync_weights(self, path: str, version: int) -> bool:
        """Asks every server to load the Hugging Face checkpoint at ``path`` as ``version``.

        Returns True once every server confirmed (rollouts are then tagged ``version``). A
        server that fails is counted in ``reload_failures``, logged in the GenerationError
        message, and left out of the pool unless it still serves the current version; the
        tag stays the old version. Raises nothing for a failed reload: returns False.
        """
        failures = []
        for url in self.urls:
            try:
                self._reload(url, str(path), int(version))
                self.pool.versions[url] = int(version)
            except GenerationError as error:
                self.reload_failures += 1
                self.pool.versions[url] = self._still_serving(url)
                failures.append(str(error))
        self.reloads += 1
        if failures:
            self.last_reload_error = "; ".join(failures)
            return False
        self.policy_version = int(version)
        return True

    def _reload(self, url: str, path: str, version: int) -> None:
        """Loads ``path`` on one server and confirms it serves ``version`` (GenerationError)."""
        raise NotImplementedError

    def _still_serving(self, url: str) -> int | None:
        """The version a server serves after a failed reload, if it can tell (else None)."""
        return None

    def close(self) -> None:
        """Stops the request threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


__all__ = [
    "GenerationError",
    "Media",
    "Request",
    "ServerPool",
    "ServerSampler",
    "ServerUnavailable",
    "ServerVisuals",
    "VersionChanged",
    "check_logprob",
    "check_sampling",
    "check_token_id",
    "decode_data_url",
    "get_json",
    "png_data_url",
    "post_json",
    "prompt_media",
    "request_json",
    "server_urls",
]
