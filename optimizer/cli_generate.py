"""``carve generate DIR --prompt TEXT``: stream text from a KV-cached decoder artifact.

The reply is printed as it is generated (decoded text, flushed per token); timing (time to first
token, tokens per second, KV bytes) goes to stderr, or everything as JSON with ``--json``.
``--ids`` takes token ids instead of text (for artifacts without a tokenizer). ``--speculative``
decodes with the artifact's self-draft (``runtime.speculative``): a fixed number of draft tokens
per round, or ``auto`` (the default when no number is given) for the UCBSpec bandit.
"""

from __future__ import annotations

import json
import sys

from runtime.errors import FeedError


def cmd_generate(args) -> int:
    import runtime
    from runtime.generate import generate
    from runtime.kv_policies import make_policy
    from runtime.sampling import Sampler
    from runtime.text import Text

    speculative = getattr(args, "speculative", None) is not None
    session = runtime.load(args.artifact, threads=args.threads, spin=not speculative)  # see runtime.speculative
    text = None if args.ids else Text(args.artifact)
    prompt = _prompt_ids(args, text)
    stops = [] if args.ignore_eos or text is None else text.stop_tokens()
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.eta, args.seed)
    stream = _Stream(text) if text is not None and not args.json else None
    if speculative:
        result = _speculative(args, session, prompt, sampler, stops, stream)
    else:
        result = generate(session, [prompt], max_new_tokens=args.max_new_tokens, sampler=sampler, stop_tokens=stops,
                          pad_token=text.pad_token() if text else 0, callback=stream,
                          policy=make_policy(args.kv_policy))
    if args.json:
        report = result.to_json()
        if text is not None:
            report["text"] = text.decode(result.tokens[0])
        print(json.dumps(report, indent=2))
        return 0
    if stream is None:
        print(" ".join(map(str, result.tokens[0])))
    else:
        stream.finish()
    print(f"{result.new_tokens} tokens after a {len(prompt)}-token prompt: first token {result.ttft_s * 1e3:.0f} ms, "
          f"{result.tokens_per_s:.1f} tokens/s ({result.decode_tokens_per_s:.1f} decoding), "
          f"KV cache {result.kv_bytes / 1e6:.1f} MB", file=sys.stderr)
    for note in result.notes:
        print(note, file=sys.stderr)
    return 0


def _speculative(args, session, prompt, sampler, stops, stream):
    """``--speculative[=GAMMA|auto]``: the artifact's self-draft proposes, the model verifies."""
    from runtime.draft import load_draft
    from runtime.speculative import speculative_generate

    if args.kv_policy:
        raise FeedError("--kv-policy does not combine with --speculative (rolled-back drafts and evicted tokens "
                        "would disagree); drop one of them.")
    draft = load_draft(args.artifact, threads=args.threads)
    return speculative_generate(session, draft, [prompt], max_new_tokens=args.max_new_tokens,
                                gamma=args.speculative, sampler=sampler, stop_tokens=stops, callback=stream)


def _prompt_ids(args, text) -> list[int]:
    if args.ids:
        try:
            return [int(x) for x in args.ids.replace(",", " ").split()]
        except ValueError:
            raise FeedError(f"--ids takes integers separated by commas or spaces, got {args.ids!r}.") from None
    if args.prompt is None:
        raise FeedError("give the prompt with --prompt TEXT (or token ids with --ids).")
    return text.chat(args.prompt, args.system) if args.chat else text.encode(args.prompt)


class _Stream:
    """Prints the decoded reply as tokens arrive (re-decoding keeps multi-byte characters whole)."""

    def __init__(self, text):
        self.text, self.tokens, self.shown = text, [], ""

    def __call__(self, step: int, tokens) -> None:
        self.tokens.append(int(tokens[0]))
        now = self.text.decode(self.tokens)
        if not now.endswith("\ufffd"):
            sys.stdout.write(now[len(self.shown):])
            sys.stdout.flush()
            self.shown = now

    def finish(self) -> None:
        sys.stdout.write(self.text.decode(self.tokens)[len(self.shown):] + "\n")
        sys.stdout.flush()
