"""Speculative decoding with an artifact's self-draft (the model with layers skipped).

Each round the draft proposes ``gamma`` tokens one step at a time through its own KV cache; the
model then reads its pending token and the ``gamma`` proposals in one cached call (a causal mask
over past and new tokens), which gives its own choice after every prefix. Greedy: proposals are
accepted while they equal the model's argmax, and the model's token at the first disagreement
(or after the last proposal) is added, so every round yields 1 to ``gamma + 1`` tokens and the
output is the model's own greedy decoding. Sampling: proposal ``x`` drawn from the draft's
distribution ``q`` is accepted with probability ``min(1, p(x) / q(x))``; on rejection a token
is drawn from ``normalize(max(0, p - q))``, so the output follows the model's distribution
``p`` (both after the sampler's temperature and truncation).

Rejected tokens are rolled back in both caches (``KVCache.keep`` of the accepted prefix; a static
cache just forgets the slots, which the mask then hides). The draft reads lazily: the prompt on
its first round, and whatever it lags (the model's last token, a fully accepted last proposal,
the tokens of rounds without the draft) with its next proposal, so rounds without it cost nothing.

``gamma`` is a fixed number of proposals per round, or ``"auto"``: a UCBSpec bandit
(``runtime.bandit``) picks it per round from ``arms``, rewarded with tokens per second; arm 0 is a
round of plain decoding, so ``auto`` can fall back to the model alone when the draft does not pay.

Load both sessions with ``runtime.load(..., spin=False)`` (``runtime.draft.load_draft`` does for the
draft): they take turns, and ONNX Runtime threads left spin-waiting after one session's call slow
the other's (measured on 2 cores: a SmolLM2 step took 1.5x as long right after a draft step).

Cases: one prompt (a batch is refused: rows would accept different counts); stop tokens and
``max_new_tokens`` end the output mid-round; a round never proposes past ``max_new_tokens``.
Refused with one sentence: a batch, an empty prompt, ``gamma < 1``, ``max_new_tokens < 1``, an
eviction policy (none is passed here), a draft that cannot pair (``runtime.draft.check_pair``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.bandit import DEFAULT_ARMS, UCBSpec
from runtime.draft import check_pair
from runtime.errors import FeedError
from runtime.generate import Generation
from runtime.kv import KVCache, KVLayout
from runtime.kv_step import Stepper
from runtime.sampling import Sampler


@dataclass
class SpeculativeGeneration(Generation):
    rounds: int = 0
    drafted: int = 0  # proposals the model checked
    accepted: int = 0  # proposals it kept
    gamma: str = ""
    bandit: dict[str, Any] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "speculative": {
            "gamma": self.gamma, "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.new_tokens / max(self.rounds, 1),
            "bandit": self.bandit}}


class Decoder:
    """One sequence through a cached artifact: feed tokens, get their logits, roll back."""

    def __init__(self, session: Any, capacity: int):
        self.cache = KVCache(KVLayout.of(session.inputs), 1, capacity)
        self.step = Stepper(session, self.cache)

    @property
    def length(self) -> int:
        return self.cache.length

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` of tokens that follow the cached ones."""
        start = self.cache.length
        ids = np.asarray([tokens], np.int64)
        mask = np.ones((1, start + len(tokens)), np.int64)
        positions = np.arange(start, start + len(tokens), dtype=np.int64)[None]
        logits, _ = self.step(ids, mask, positions)
        return logits[0]

    def rollback(self, length: int) -> None:
        """Forget every cached token after the first ``length``."""
        if length >= self.cache.length:
            return
        if self.cache.layout.static:  # slots are addressed by position; the mask hides the rest
            self.cache.lengths = [length] * len(self.cache.lengths)
        else:
            self.cache.keep(np.arange(length))


def speculative_generate(session: Any, draft: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                         gamma: int | str = 4, sampler: Sampler | None = None, stop_tokens: Sequence[int] = (),
                         callback: Callable[[int, np.ndarray], None] | None = None,
                         arms: Sequence[int] = DEFAULT_ARMS, bandit: UCBSpec | None = None) -> SpeculativeGeneration:
    """Generate like ``runtime.generate`` (one prompt) with ``draft`` proposing ``gamma`` tokens a round;
    with ``gamma="auto"`` a ``bandit`` given here carries what it learnt from call to call."""
    chooser = bandit if gamma == "auto" and bandit is not None else _chooser(gamma, arms)
    if len(prompts) != 1 or len(prompts[0]) == 0:
        raise FeedError("speculative decoding takes exactly one prompt with at least one token.")
    if max_new_tokens < 1:
        raise FeedError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    check_pair(session, draft)
    run = _Run(session, draft, list(prompts[0]), max_new_tokens, sampler or Sampler(), chooser)
    return run.generate(set(int(t) for t in stop_tokens), callback, str(gamma))


def _chooser(gamma: int | str, arms: Sequence[int]) -> UCBSpec | int:
    if gamma == "auto":
        return UCBSpec(tuple(arms))
    try:
        value = int(gamma)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or str(value) != str(gamma).strip():
        raise FeedError(f"gamma (draft tokens per round) must be a whole number >= 1 or 'auto', got {gamma!r}.")
    return value


class _Run:
    """The state of one speculative generation: the sequence so far and both decoders."""

    def __init__(self, session: Any, draft: Any, prompt: list[int], max_new: int, sampler: Sampler,
                 chooser: UCBSpec | int):
        longest = max(chooser.arms) if isinstance(chooser, UCBSpec) else chooser
        capacity = len(prompt) + max_new + longest + 1
        self.model, self.draft = Decoder(session, capacity), Decoder(draft, capacity)
        self.prompt, self.max_new, self.sampler, self.chooser = prompt, max_new, sampler, chooser
        self.seq = list(prompt)  # the model's cache holds all but the last token; the draft a prefix
        self.rounds = self.drafted = self.accepted = 0
        self.catch_up = 0.0  # seconds the draft spent reading the prompt and lagging tokens this round

    def generate(self, stops: set[int], callback, gamma_label: str) -> SpeculativeGeneration:
        start = time.perf_counter()
        first = self._pick(self.model.feed(self.prompt)[-1:])[0]
        ttft = time.perf_counter() - start
        out: list[int] = []
        done = self._emit([first], out, stops, callback)
        while not done:
            round_start = time.perf_counter()
            arm = self.chooser.choose() if isinstance(self.chooser, UCBSpec) else self.chooser
            new = self._round(min(arm, self.max_new - len(out) - 1))
            if isinstance(self.chooser, UCBSpec):  # the draft's catching up is not the arm's cost
                self.chooser.record(arm, len(new) / (time.perf_counter() - round_start - self.catch_up))
            done = self._emit(new, out, stops, callback)
        seconds = time.perf_counter() - start
        kv = self.model.cache.nbytes() + self.draft.cache.nbytes()
        bandit = self.chooser.describe() if isinstance(self.chooser, UCBSpec) else {}
        return SpeculativeGeneration([out], [len(self.prompt)], ttft, seconds, kv, rounds=self.rounds,
                                     drafted=self.drafted, accepted=self.accepted, gamma=gamma_label, bandit=bandit,
                                     notes=[_note(self, gamma_label, bandit)])

    def _emit(self, new: list[int], out: list[int], stops: set[int], callback) -> bool:
        """Append the round's tokens up to a stop token or the limit; True when generation ends."""
        for token in new:
            out.append(token)
            if callback is not None:
                callback(len(out) - 1, np.asarray([token]))
            if token in stops or len(out) == self.max_new:
                return True
        self.seq += new
        return False

    def _round(self, gamma: int) -> list[int]:
        """Draft ``gamma`` tokens, verify them in one call, keep the accepted prefix."""
        proposals, draft_probs = self._propose(gamma)
        base = len(self.seq) - 1
        logits = self.model.feed([self.seq[-1]] + proposals)
        if self.sampler.greedy:
            kept, last = _accept_greedy(logits, proposals)
        else:
            kept, last = _accept_sampled(logits, proposals, draft_probs, self.sampler)
        self.model.rollback(base + 1 + kept)
        self.draft.rollback(min(self.draft.length, len(self.seq) + kept))
        self.rounds += 1
        self.drafted += len(proposals)
        self.accepted += kept
        return proposals[:kept] + [last]

    def _propose(self, gamma: int) -> tuple[list[int], list[np.ndarray]]:
        proposals: list[int] = []
        probs: list[np.ndarray] = []
        self.catch_up = 0.0
        pending = self._catch_up() if gamma else []
        for _ in range(gamma):
            row = self.draft.feed(pending)[-1]
            if self.sampler.greedy:
                token = int(row.argmax())
            else:
                probs.append(self.sampler.distribution(row))
                token = int(self.sampler.draw(probs[-1]))
            proposals.append(token)
            pending = [token]
        return proposals, probs

    def _catch_up(self) -> list[int]:
        """Feed the draft what it has not read but the last token (the prompt, on its first round;
        the tokens of rounds without the draft), timed apart; returns what is left to read."""
        pending = self.seq[self.draft.length:]
        if len(pending) > 2:
            start = time.perf_counter()
            self.draft.feed(pending[:-1])
            self.catch_up, pending = time.perf_counter() - start, pending[-1:]
        return pending

    def _pick(self, logits: np.ndarray) -> list[int]:
        return [int(t) for t in self.sampler(logits)]


def _accept_greedy(logits: np.ndarray, proposals: list[int]) -> tuple[int, int]:
    """How many proposals equal the model's argmax, and the model's token after them."""
    choice = logits.argmax(-1)
    kept = 0
    while kept < len(proposals) and proposals[kept] == choice[kept]:
        kept += 1
    return kept, int(choice[kept])


def _accept_sampled(logits: np.ndarray, proposals: list[int], draft_probs: list[np.ndarray],
                    sampler: Sampler) -> tuple[int, int]:
    """The speculative-sampling rule (see the module docstring)."""
    for i, token in enumerate(proposals):
        p, q = sampler.distribution(logits[i]), draft_probs[i]
        if sampler.uniform() * q[token] < p[token]:  # accept with probability min(1, p/q)
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return i, int(sampler.draw(residual / total if total > 0 else p))
    return len(proposals), int(sampler.draw(sampler.distribution(logits[len(proposals)])))


def _note(run: _Run, gamma: str, bandit: dict) -> str:
    rate = run.accepted / run.drafted if run.drafted else 0.0
    text = (f"speculative (gamma={gamma}): {run.rounds} rounds, {run.accepted} of {run.drafted} draft tokens "
            f"accepted ({rate:.0%})")
    if bandit:
        pulls = ", ".join(f"{a}: {v['pulls']}" for a, v in bandit["arms"].items())
        text += f"; arm pulls {pulls}; best gamma {bandit['best']}"
    return text
