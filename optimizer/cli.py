"""The ``carve`` command line. Every user mistake ends as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys

from runtime.errors import CarveError

EPILOG = """examples:
  carve optimize minilm -o out/minilm --compare
  carve optimize model.onnx -o out/m --passes cleanup --passes 'cse'
  carve optimize smollm2-135m -o out/llm --recipe recipe.toml
  carve inspect minilm
  carve inspect model.onnx --json
  carve run out/minilm --input input_ids=ids.npy --input attention_mask=mask.npy --save outputs/
  carve eval out/minilm
  carve bench out/minilm --plot bench.png
  carve optimize smollm2-135m -o out/llm --passes kv_cache
  carve generate out/llm --prompt "What is a compiler?" --chat --max-new-tokens 64
  carve passes

MODEL is an .onnx file, a Hugging Face model directory, an artifact directory, or a built-in
name (carve models lists them). Set CARVE_DEBUG=1 to see tracebacks."""


def build_parser() -> argparse.ArgumentParser:
    import optimizer

    parser = argparse.ArgumentParser(prog="carve", description="Optimize transformer models for inference.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"carve {optimizer.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_optimize(sub)
    _add_inspect(sub)
    _add_run(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_generate(sub)
    sub.add_parser("passes", help="list the available passes and their options")
    sub.add_parser("models", help="list the built-in models")
    return parser


def _add_optimize(sub) -> None:
    p = sub.add_parser("optimize", help="optimize a model into an artifact directory",
                       description="Trace or load MODEL, run passes in order, lower to a target, write an artifact.",
                       epilog="example: carve optimize minilm -o out/minilm --passes cleanup --compare",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory to write")
    p.add_argument("--passes", action="append", default=[], metavar="SPEC",
                   help="a pass as 'name:key=value,...' (repeatable; run in order; default: cleanup)")
    p.add_argument("--recipe", metavar="FILE", help="a TOML recipe listing passes (runs before --passes)")
    p.add_argument("--target", default="ort-cpu", help="where the artifact will run (default: ort-cpu)")
    p.add_argument("--compare", action="store_true",
                   help="time the original and the optimized graph side by side and report accuracy")
    p.add_argument("--batch", type=int, default=8, help="batch size for --compare (default 8)")
    p.add_argument("--seq", type=int, default=128, help="sequence length for --compare (default 128)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per graph for --compare (default 20)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a model's map: blocks, attention sites, token axis",
                       epilog="example: carve inspect minilm --json")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="print the map as JSON (see docs/inspect.md)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="measure an artifact's accuracy against its unoptimized source model",
                       epilog="example: carve eval out/minilm --json (metrics: docs/metrics.md)")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--quick", action="store_true", help="fewer samples (seconds instead of a minute)")
    p.add_argument("--kv-policies", metavar="SPECS",
                   help="KV-cached decoders: compare eviction policies instead, e.g. "
                        "'window:size=250;sinks:size=250,sinks=4;heavy:size=250' (needs kv_cache:scores=true for heavy)")
    p.add_argument("--kv-tokens", type=int, default=1000, help="tokens of held-out text for --kv-policies (default 1000)")
    p.add_argument("--stream", type=int, metavar="FRAMES",
                   help="feature_cache or prune_tokens:mode=frames artifacts: run a stream of this many nearly "
                        "identical frames instead")
    p.add_argument("--scene", type=int, default=8, help="frames per scene for --stream (default 8)")
    p.add_argument("--moving", action="store_true",
                   help="--stream: a patch moving over a still photo instead of noisy scenes")
    p.add_argument("--refresh", type=int, default=0, metavar="N",
                   help="--stream: drop the carried state every N frames, so that frame computes everything")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time an artifact against its peers (ORT fp32, ORT quantized, torch) with accuracy",
                       description="Time the artifact and its peers side by side in one process: interleaved runs "
                                   "after warm-up, medians, speed-up against ORT fp32 on the plain trace, and each "
                                   "system's output agreement with ORT fp32 on the same inputs.",
                       epilog="examples: carve bench out/minilm --runs 20 --plot bench.png; "
                              "carve bench out/smollm2-torch --target torch --device cuda (columns: docs/metrics.md)")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw speed-up against accuracy, one point per system")
    p.add_argument("--batch", type=int, help="batch size (default: 8, or 1 for decoders)")
    p.add_argument("--seq", type=int, help="tokens per sequence for text models (default 128)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per system (default 20)")
    p.add_argument("--peers", metavar="LIST",
                   help="comma-separated systems (default all): carve, ort-fp32, ort-quant, ort-opt+quant, "
                        "torch-eager, hf-generate; carve and ort-fp32 are always included")
    p.add_argument("--threads", type=int, help="intra-op threads for ORT and torch alike (default: physical cores)")
    p.add_argument("--new-tokens", type=int, help="decoders: tokens generated per timed generation (default 32)")
    p.add_argument("--prompt-tokens", type=int,
                   help="decoders: prompt of this many tokens of held-out text (default: one short sentence; "
                        "64 with --target torch)")
    p.add_argument("--target", choices=("ort", "torch"), default="ort",
                   help="ort (default): against ORT fp32 and ORT's tools; torch: a --target torch artifact against "
                        "the original Hugging Face model, eager and torch.compile, on --device")
    p.add_argument("--device", help="--target torch: the torch device (default: cuda when present, else cpu)")
    p.add_argument("--warmup", type=int, default=3, help="--target torch: untimed rounds first (default 3)")
    p.add_argument("--no-compile", action="store_true", help="--target torch: skip the torch.compile rows")
    p.add_argument("--compile-backend", default="inductor", metavar="NAME",
                   help="--target torch: torch.compile backend (default inductor; aot_eager for a quick CPU check)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a KV-cached decoder artifact (made with --passes kv_cache)",
                       epilog='example: carve generate out/llm --prompt "Tell me a story" --chat --temperature 0.7 --top-p 0.9')
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    p.add_argument("--ids", metavar="LIST", help="the prompt as token ids (comma- or space-separated) instead of text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="a system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; above 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (default 1)")
    p.add_argument("--eta", type=float, default=0.0, help="eta-sampling cutoff (e.g. 0.0009; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--kv-policy", metavar="SPEC",
                   help="KV eviction, e.g. 'window:size=256' or 'sinks:sinks=4,size=256' (docs/generate.md)")
    p.add_argument("--speculative", nargs="?", const="auto", metavar="GAMMA",
                   help="decode with the artifact's self-draft (skip_layers:draft=true): GAMMA draft tokens per "
                        "round, or auto (default) to choose it online (docs/generate.md)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", action="store_true", help="print tokens, text and timing as JSON")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run an artifact on inputs stored as .npy files",
                       epilog="example: carve run out/minilm --input input_ids=ids.npy --input attention_mask=mask.npy")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input (repeatable)")
    p.add_argument("--save", metavar="DIR", help="write each output to DIR/NAME.npy")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--device", help="torch device for artifacts made with --target torch (cpu, cuda, cuda:N)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from optimizer import cli_commands

    handler = getattr(cli_commands, f"cmd_{args.command}")
    try:
        return handler(args) or 0
    except CarveError as exc:
        if os.environ.get("CARVE_DEBUG"):
            raise
        print(f"carve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("carve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
