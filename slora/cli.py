"""`slora generate ...`: the command line over the offline API."""

from __future__ import annotations

import argparse
import sys

from slora.engine.sampling_params import SamplingParams


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder, .gguf file or dummy:NAME (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-slots", type=int, default=None, help="pool size in slots (one slot = one token's K and V)")
    parser.add_argument("--pool-memory", default=None, help="pool size in bytes ('2GiB') or a fraction of free memory (0.9)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=None)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    memory = args.pool_memory
    if memory is not None and memory.replace(".", "", 1).isdigit():
        memory = float(memory) if "." in memory else int(memory)
    return dict(
        model=args.model, device=args.device, dtype=args.dtype, num_slots=args.num_slots, pool_memory=memory,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
    )


def _generate(args: argparse.Namespace) -> int:
    from slora import LLM

    llm = LLM(**_engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    many = len(args.prompts) > 1
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=many)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=many)
    failed = False
    for prompt, output in zip(args.prompts, outputs):
        if many:
            print(f"### {prompt}")
        if output.error:
            failed = True
            print(f"error: {output.error}", file=sys.stderr)
        else:
            print(output.text)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slora", description="Serve one LLM with thousands of LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate text for prompts, offline")
    _add_engine_options(generate)
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("prompts", nargs="+", metavar="PROMPT")
    generate.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
