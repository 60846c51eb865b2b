"""`slora generate ...`: the command line over the offline API."""

from __future__ import annotations

import argparse
import json
import os
import sys

from slora.config import ADMISSIONS, LoRAConfig, SchedulerConfig, ServerOptions
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
    parser.add_argument("--admission", choices=ADMISSIONS, default=SchedulerConfig.admission,
                        help="when a waiting request starts: optimistic (preempt and recompute when the pool runs "
                             "out) or reserve (only if every running request can reach its max_tokens)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    memory = args.pool_memory
    if memory is not None and memory.replace(".", "", 1).isdigit():
        memory = float(memory) if "." in memory else int(memory)
    return dict(
        model=args.model, device=args.device, dtype=args.dtype, num_slots=args.num_slots, pool_memory=memory,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, admission=args.admission,
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


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from slora.config import EngineConfig, PoolConfig, SchedulerConfig
    from slora.server.app import build_app

    adapters = {}
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"error: --lora takes NAME=PATH, got {item!r}", file=sys.stderr)
            return 2
        adapters[name] = path
    kwargs = _engine_kwargs(args)
    config = EngineConfig(
        model=kwargs["model"], device=kwargs["device"], dtype=kwargs["dtype"], seed=args.seed,
        pool=PoolConfig(num_slots=kwargs["num_slots"], memory=kwargs["pool_memory"]),
        scheduler=SchedulerConfig(kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"], kwargs["max_model_len"],
                                  kwargs["admission"]),
        lora=LoRAConfig(adapters, args.lora_dir, args.max_lora_rank, args.max_cpu_adapters, args.adapter_prefetch),
    )
    options = ServerOptions(served_model_name=args.served_model_name, api_key=args.api_key,
                            adapter_root=args.adapter_root, max_queue=args.max_queue,
                            max_prompt_tokens=args.max_prompt_tokens, max_total_tokens=args.max_total_tokens,
                            max_n=args.max_n, max_body_size=args.max_body_size,
                            max_concurrency_per_key=args.max_concurrency_per_key,
                            check_adapter_weights=args.check_adapter_weights)
    try:
        app = build_app(config, options)
    except ValueError as error:  # a model or adapter that cannot be loaded: the message names it
        print(f"error: {error}", file=sys.stderr)
        return 2
    server = app.state.server
    adapters_now = list(server.engine.snapshot.adapters)
    _print_examples(f"http://{args.host}:{args.port}/v1", server.model_name, adapters_now, bool(args.api_key))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _print_examples(url: str, model: str, adapters: list[str], with_key: bool) -> None:
    auth = ' -H "Authorization: Bearer $SLORA_API_KEY"' if with_key else ""
    key = "$SLORA_API_KEY" if with_key else "none"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    code = (f"from openai import OpenAI; c = OpenAI(base_url='{url}', api_key='{key}'); "
            f"print(c.completions.create(model='{adapters[0] if adapters else model}', "
            "prompt='Once upon a time', max_tokens=32).choices[0].text)")
    print(f"slora: serving {model} with {len(adapters)} adapters at {url}")
    print(f"  curl {url}/chat/completions{auth} -H 'Content-Type: application/json' -d '{body}'")
    print(f'  python -c "{code}"', flush=True)


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
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _add_engine_options(serve)
    serve.add_argument("--served-model-name", default=None,
                       help="the base model's name in the API (default: its folder name)")
    serve.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                       help="an adapter to serve (repeatable)")
    serve.add_argument("--lora-dir", default=None, help="serve every adapter folder inside DIR, named after its folder")
    serve.add_argument("--max-lora-rank", type=int, default=256)
    serve.add_argument("--max-cpu-adapters", type=int, default=None, help="adapters kept packed in host memory")
    serve.add_argument("--adapter-prefetch", type=int, default=LoRAConfig.prefetch,
                       help="adapters of waiting requests loaded into the pool ahead, per step (0: off)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("SLORA_API_KEY") or None,
                       help="required bearer key on /v1/* (default: $SLORA_API_KEY)")
    serve.add_argument("--adapter-root", default=None, help="allow run-time adapter loading from inside DIR only")
    limits = ServerOptions()
    serve.add_argument("--max-queue", type=_optional_int, default=limits.max_queue,
                       help="sequences that may wait beyond --max-num-seqs; more get 503 + Retry-After ('none': no limit)")
    serve.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="tokens of one prompt (default: the context less one)")
    serve.add_argument("--max-total-tokens", type=int, default=None,
                       help="prompt + max_tokens of one prompt; an unset max_tokens gets the rest (default: the context)")
    serve.add_argument("--max-n", type=int, default=limits.max_n, help="completions per prompt")
    serve.add_argument("--max-body-size", type=int, default=limits.max_body_size,
                       help="bytes of a request body; larger bodies get 413 before they are parsed")
    serve.add_argument("--max-concurrency-per-key", type=_optional_int, default=limits.max_concurrency_per_key,
                       help="with --api-key: generation calls in flight per key; more get 429 + Retry-After")
    serve.add_argument("--check-adapter-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="read every start-up adapter's weights at start, refusing NaN/Inf (off: on first use)")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=_serve)
    _add_bench_commands(commands)
    return parser


def _add_bench_commands(commands) -> None:
    """`slora bench <what> ...`: one sub-command per benchmark."""
    from slora.bench import cli as serving_bench
    from slora.bench import kernels

    bench = commands.add_parser("bench", help="benchmarks (results: bench/results/<run>/)")
    benchmarks = bench.add_subparsers(dest="bench_command", required=True)
    kernel_bench = benchmarks.add_parser("kernels", help="Triton kernels vs the torch reference and S-LoRA's "
                                         "ablations: time, bandwidth, FLOP/s")
    kernels.add_arguments(kernel_bench)
    kernel_bench.set_defaults(run=kernels.run_from_args)
    serving_bench.register(benchmarks)


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
