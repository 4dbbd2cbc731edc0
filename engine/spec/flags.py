"""Command-line flags for speculative decoding, shared by ``engine generate`` and ``engine serve``.

Names follow ``vllm serve`` where one exists (``--num-speculative-tokens``); a bad combination exits
with a message that names the flag.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from common.methods import METHODS

if TYPE_CHECKING:
    from engine.spec.config import SpecConfig


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", choices=METHODS, default="none", help="speculative decoding method")
    parser.add_argument(
        "--k",
        "--num-speculative-tokens",
        dest="k",
        type=int,
        default=None,
        help="draft tokens per step (Medusa: heads); required with --spec",
    )
    parser.add_argument(
        "--prompt-lookup-min", type=int, default=None, help="ngram window (vLLM's default: = max, or 5)"
    )
    parser.add_argument(
        "--prompt-lookup-max", type=int, default=None, help="ngram window (vLLM's default: = min, or 5)"
    )
    parser.add_argument(
        "--draft-model", default=None, help="drafter for --spec draft (default: truncated target)"
    )
    parser.add_argument(
        "--draft-layers", type=int, default=None, help="draft: layers of a truncated-target drafter"
    )
    parser.add_argument("--medusa-heads", default=None, help="Medusa heads file for --spec medusa")
    parser.add_argument(
        "--spec-schedule",
        default=None,
        help="k by running batch size, JSON [[first,last,k],...] (vLLM's num_speculative_tokens_per_batch_"
        "size); other batch sizes use --k, the largest",
    )
    parser.add_argument(
        "--spec-controlled",
        default=None,
        metavar="alpha=A,coverage=C",
        help="validation only: drafts are the recorded greedy continuation corrupted to this acceptance "
        "(or acceptance=A0:A1:...); the real --spec drafter still runs for its cost",
    )


def spec_config(args: argparse.Namespace, command: str) -> SpecConfig | None:
    """The SpecConfig the flags describe (None without --spec); ``command`` prefixes the errors."""
    if args.spec == "none":
        if args.k is not None:
            raise SystemExit(f"{command}: --k needs --spec ngram|draft|medusa")
        return None
    if args.k is None:
        raise SystemExit(f"{command}: --spec {args.spec} needs --k (num_speculative_tokens)")
    from engine.spec import SpecConfig

    kwargs: dict[str, object] = {"method": args.spec, "k": args.k}
    if getattr(args, "spec_schedule", None) is not None:
        try:
            kwargs["schedule"] = json.loads(args.spec_schedule)
        except json.JSONDecodeError as exc:
            raise SystemExit(
                f"{command}: --spec-schedule is not JSON ({exc}): {args.spec_schedule!r}"
            ) from None
    if args.spec == "ngram":
        kwargs |= {"prompt_lookup_min": args.prompt_lookup_min, "prompt_lookup_max": args.prompt_lookup_max}
    elif args.spec == "draft":
        kwargs |= {"draft_model": args.draft_model, "draft_layers": args.draft_layers}
    elif args.spec == "medusa":
        kwargs |= {"medusa_heads": args.medusa_heads}
    if getattr(args, "spec_controlled", None):
        kwargs["controlled"] = args.spec_controlled
    return SpecConfig(**kwargs)  # type: ignore[arg-type]
