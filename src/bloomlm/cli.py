"""The `bloomlm` command line: thin argparse front ends over the library; no model math here."""

from __future__ import annotations

import argparse
import json
import sys

from bloomlm.config import BloomConfig


def _info(args: argparse.Namespace) -> int:
    """Config summary and parameter count, counted on the meta device (no memory for weights)."""
    import torch

    from bloomlm.torch.model import BloomForCausalLM

    config = BloomConfig.from_pretrained(args.path)
    with torch.device("meta"):
        n_params = BloomForCausalLM(config).num_parameters()
    summary = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "pretraining_tp": config.pretraining_tp,
        "torch_dtype": config.torch_dtype,
        "parameters": n_params,
        "bytes_fp32": 4 * n_params,
        "bytes_bf16": 2 * n_params,
    }
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloomlm",
        description="BLOOM language models in PyTorch and JAX/Flax, a drop-in for transformers' BLOOM classes.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="summarise a model folder: shapes and parameter count")
    info.add_argument("path", help="model folder (or a config.json)")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except Exception as err:  # one clear line for users; --debug for the traceback
        if args.debug:
            raise
        print(f"bloomlm {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
