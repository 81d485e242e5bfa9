"""Running a stream of inputs with reuse across calls: the feature cache's state and an exact-input cache.

``StreamSession(session)`` wraps a loaded artifact and feeds each call the state the previous
call returned: for the ``feature_cache`` pass the last computed residual and outputs (calls whose
input barely changed skip the model after the first block; ``recomputed``/``calls`` count how
often the rest ran), for ``prune_tokens:mode=frames`` the previous frame's token features
(tokens that did not change are dropped) and, with ``fill=cache``, every token's last output
(dropped tokens reuse it; ``token_blocks_saved`` adds up the token-block evaluations skipped).
State is name-driven: ``STATE_PAIRS`` maps each state output to the input the next call gets it
on, and ``feature_cache.previous.<output>`` inputs get the call's own outputs. With ``exact=N``
it also keeps the outputs of the last N distinct inputs, keyed by a hash of the feeds, so an
input seen before (the same image) returns its outputs without running anything.

``refresh=N`` drops the state before every N-th run, so that call computes everything: reused
values (a token's cached output, computed while its neighbours looked different) cannot go
stale for longer than N frames.

A plain ``Session.run`` of such an artifact gets zero state (``stateless_feeds``): the feature
cache then recomputes and the frames criterion counts every token as changed, so the first call
of a stream, ``carve run`` and ``carve eval`` see the whole model.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np

from runtime.errors import CarveError

RESIDUAL_IN = "feature_cache.residual"
RESIDUAL_OUT = "feature_cache.next_residual"
RECOMPUTED = "feature_cache.recomputed"
PREVIOUS = "feature_cache.previous."
FRAME_IN, FRAME_OUT = "prune_tokens_previous_frame", "prune_tokens_frame_features"
CACHE_IN, CACHE_OUT = "prune_tokens_previous_output", "prune_tokens_output_features"
KV_IN, KV_OUT = "prune_tokens_previous_keys_values", "prune_tokens_keys_values"
SAVED = "prune_tokens_token_blocks_saved"
STATE_PAIRS = {RESIDUAL_OUT: RESIDUAL_IN, FRAME_OUT: FRAME_IN, CACHE_OUT: CACHE_IN, KV_OUT: KV_IN}  # out -> next in
_NOT_RESULTS = set(STATE_PAIRS) | {RECOMPUTED, SAVED}


def _is_state(name: str) -> bool:
    return name in STATE_PAIRS.values() or name.startswith(PREVIOUS)


def has_state(inputs: list[dict]) -> bool:
    return any(_is_state(spec["name"]) for spec in inputs)


def stateless_feeds(inputs: list[dict], feeds: dict) -> dict:
    """``feeds`` plus zero state where the artifact wants state and none was given."""
    if not has_state(inputs) or any(_is_state(name) for name in feeds):
        return dict(feeds)
    sizes = _symbol_sizes(inputs, feeds)
    out = dict(feeds)
    for spec in inputs:
        if _is_state(spec["name"]):
            shape = [d if isinstance(d, int) else sizes.get(d, 1) for d in spec["shape"] or []]
            out[spec["name"]] = np.zeros(shape, np.dtype(spec["dtype"]))
    return out


def _symbol_sizes(inputs: list[dict], feeds: dict) -> dict[str, int]:
    sizes = {}
    for spec in inputs:
        if spec["name"] in feeds and spec["shape"]:
            for dim, size in zip(spec["shape"], np.shape(feeds[spec["name"]])):
                if isinstance(dim, str):
                    sizes[dim] = int(size)
    return sizes


class StreamSession:
    def __init__(self, session: Any, exact: int = 0, refresh: int = 0):
        if refresh < 0 or exact < 0:
            raise CarveError(f"StreamSession takes exact >= 0 (inputs remembered) and refresh >= 0 (0: never drop the "
                             f"state), got exact={exact}, refresh={refresh}.")
        self.session, self.exact, self.refresh = session, exact, refresh
        self._runs = 0
        self.stateful = has_state(session.inputs)
        self.outputs = [o["name"] for o in session.outputs if o["name"] not in _NOT_RESULTS]
        self.state: dict[str, np.ndarray] = {}
        self.calls = self.recomputed = self.exact_hits = self.token_blocks_saved = 0
        self._seen: OrderedDict[bytes, dict] = OrderedDict()

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        self.calls += 1
        key = _digest(feeds) if self.exact else None
        if key is not None and key in self._seen:
            self._seen.move_to_end(key)
            self.exact_hits += 1
            return self._seen[key]
        result = self._run(feeds)
        if key is not None:
            self._seen[key] = result
            while len(self._seen) > self.exact:
                self._seen.popitem(last=False)
        return result

    def _run(self, feeds: dict) -> dict[str, np.ndarray]:
        if not self.stateful:
            self.recomputed += 1
            return self.session.run(feeds, self.outputs)
        if self.refresh and self._runs % self.refresh == 0:
            self.state = {}  # zero state: this call computes everything, and reused values start afresh
        self._runs += 1
        batch = np.shape(next(iter(feeds.values())))[0]
        same_shape = bool(self.state) and all(v.shape[0] == batch for v in self.state.values())
        outs = self.session.run({**feeds, **(self.state if same_shape else {})})
        self.recomputed += bool(outs.get(RECOMPUTED, True))
        self.token_blocks_saved += int(np.sum(outs.get(SAVED, 0)))
        self.state = {STATE_PAIRS[name]: value for name, value in outs.items() if name in STATE_PAIRS}
        if RESIDUAL_OUT in outs:
            self.state.update({PREVIOUS + n: outs[n] for n in self.outputs})
        return {n: outs[n] for n in self.outputs}

    def reset(self) -> None:
        self.state, self._runs = {}, 0


def _digest(feeds: dict) -> bytes:
    h = hashlib.sha256()
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        h.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode() + array.tobytes())
    return h.digest()
