"""`layerexit generate`: greedy generation with per-token early exit or self-speculative decoding.

Strategies: ``full`` (every layer), ``early-exit`` (each token stops at the first layer the rule accepts; the
skipped layers' KV cache is filled by state propagation or deferred recomputation, ``--kv``) and
``speculative`` (draft with the first ``--draft-layers`` layers, verify with the whole model; output equals
the full model's). Generation runs one prompt at a time (batch size 1). ``--evaluate`` runs the full model on
every prompt too and reports tokens/s, average layers, token match and ROUGE-L against it, with plots.
``--train-exits DIR`` first trains per-exit adapters on a packaged corpus (frozen backbone) and saves them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..catalog import CORPORA, DEFAULT_DECODER, GENERATION_OBJECTIVES, KV_STRATEGIES, PACKAGED_DECODERS, TOKEN_RULES
from ..errors import bad_value
from ..preflight import check_decoder, writable_folder
from .common import (add_device_options, arg, at_least, command_parser, device_and_dtype, in_range, int_list,
                     positive_int_list)

#: a rule threshold, a draft probability: probabilities or cosine similarities in [0, 1]
PROBABILITY = in_range(0, 1, example="0.9")

EXAMPLES = """examples:
  layerexit generate --prompt "Once upon a time" --strategy speculative --draft-layers 12
  layerexit generate --prompts-file prompts.txt --strategy early-exit --rule saturation --threshold 0.95 \\
      --min-layer 10 --kv recompute --exits runs/smollm2-exits
  layerexit generate --train-exits runs/smollm2-exits --train-layers 10,15,20 --steps 100
  layerexit generate --prompts-file prompts.txt --strategy early-exit --rule maxprob --threshold 0.8 \\
      --exits runs/smollm2-exits --evaluate --output runs/gen-eval
"""


def add_parser(subparsers):
    p = command_parser(subparsers, "generate", "generate text with early exit or self-speculative decoding",
                       __doc__, EXAMPLES)
    p.add_argument("--model", default=DEFAULT_DECODER, help=f"decoder: packaged {sorted(PACKAGED_DECODERS)}, a hub name or "
                   "a local folder (Llama/Mistral/Qwen2/GPT-2 layouts)")
    p.add_argument("--exits", help="folder of trained exits (save_exits / --train-exits); default: shared head")
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--strategy", default="early-exit", choices=["full", "early-exit", "speculative"])
    p.add_argument("--rule", default="maxprob", choices=sorted(TOKEN_RULES))
    p.add_argument("--threshold", type=float, help="rule threshold: a probability in [0, 1], for saturation a cosine "
                   "similarity in [-1, 1] (default: the rule's own)")
    arg(p, "--min-layer", type=int, default=1, check=at_least(1), help="no exit before this layer (1-based)")
    arg(p, "--exit-layers", check=positive_int_list("--exit-layers"), help="only these layers may exit, e.g. 10,15,20")
    p.add_argument("--decay", action="store_true", help="CALM's decaying threshold along the sequence")
    p.add_argument("--kv", default="propagate", choices=list(KV_STRATEGIES),
                   help="KV cache of skipped layers: state propagation or deferred recomputation")
    arg(p, "--draft-layers", type=int, check=at_least(1), help="speculative: layers used to draft (default L/2)")
    arg(p, "--num-draft", type=int, default=4, check=at_least(1), help="speculative: tokens drafted per step")
    arg(p, "--draft-threshold", type=float, check=PROBABILITY, help="speculative: stop drafting after a draft token "
        "whose probability is below this (adaptive draft length)")
    p.add_argument("--draft-vocab", type=int, help="speculative: draft over the N most frequent tokens of --corpus "
                   "only (a cheaper draft head; the output is still exactly the full model's)")
    arg(p, "--max-new-tokens", type=int, default=64, check=at_least(1), help="tokens generated per prompt")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at the tokenizer's end-of-sequence token")
    p.add_argument("--no-stream", action="store_true", help="print each continuation only when it is complete")
    arg(p, "--threads", type=int, check=at_least(1), help="torch CPU threads")
    p.add_argument("--evaluate", action="store_true", help="compare with the full model (writes --output)")
    p.add_argument("--compare-hf", action="store_true", help="with --evaluate: also time transformers' generate")
    p.add_argument("--output", help="folder for results.json, report.md and plots (--evaluate)")
    add_device_options(p)
    g = p.add_argument_group("training exits (frozen backbone)")
    g.add_argument("--train-exits", help="train per-exit adapters, save them here, then continue with them")
    g.add_argument("--corpus", default="shakespeare", help=f"{', '.join(CORPORA)} or a local text file")
    g.add_argument("--train-layers", help="exits to train, e.g. 10,15,20 (default all; each costs an LM head)")
    g.add_argument("--adapter-kind", default="linear", choices=["linear", "lowrank"],
                   help="linear: affine shortcut per exit fitted by ridge regression (fast, no gradients); "
                   "lowrank: residual adapters trained with --objective")
    g.add_argument("--adapter-rank", type=int, default=64)
    g.add_argument("--objective", default="distill", choices=list(GENERATION_OBJECTIVES),
                   help="distill: match the last layer's distribution; weighted: next-token cross-entropy")
    arg(g, "--steps", type=int, default=100, check=at_least(1), help="training steps (linear: blocks fitted = "
        "steps x batch)")
    arg(g, "--batch-size", type=int, default=4, check=at_least(1), help="blocks per training step")
    arg(g, "--seq-len", type=int, default=128, check=at_least(2), help="tokens per training block")
    arg(g, "--lr", type=float, default=1e-3, check=in_range(0, 1, low_open=True), help="learning rate of the exits")
    arg(g, "--lora-rank", type=int, default=0, check=at_least(0), help="also train LoRA in the attention (needs "
        "peft; use --adapter-kind lowrank, --adapter-rank 0 for LoRA alone)")
    arg(g, "--lora-lr", type=float, default=1e-4, check=in_range(0, 1, low_open=True), help="learning rate of LoRA")
    p.set_defaults(run=run, check=check)
    return p


def check(args) -> None:
    """Every option, the decoder's kind and the output folders, before any model is loaded."""
    if args.threshold is not None:
        low = -1 if args.rule == "saturation" else 0  # cos(h_{l-1}, h_l) lies in [-1, 1]; probabilities in [0, 1]
        in_range(low, 1, example="0.9")("--threshold", args.threshold)
    if args.prompt or args.prompts_file or not args.train_exits:
        read_prompts(args)
    if args.draft_vocab is not None and (args.strategy != "speculative" or args.draft_vocab < 1):
        raise bad_value("--draft-vocab", args.draft_vocab, "give a positive size, with --strategy speculative")
    if args.evaluate and not args.output:
        raise bad_value("--output", None, "--evaluate writes results.json, report.md and plots: give --output DIR")
    if args.exits and not Path(args.exits).is_dir():
        raise bad_value("--exits", args.exits, "give a folder of trained exits (from --train-exits)")
    check_decoder("--model", args.model)
    if args.output:
        writable_folder("--output", args.output)
    if args.train_exits:
        writable_folder("--train-exits", args.train_exits)


def read_prompts(args) -> list[str]:
    if bool(args.prompt) == bool(args.prompts_file):
        raise bad_value("--prompt/--prompts-file", args.prompt or args.prompts_file,
                        "give exactly one of --prompt TEXT or --prompts-file FILE")
    if args.prompt:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise bad_value("--prompts-file", args.prompts_file, "give an existing text file, one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise bad_value("--prompts-file", args.prompts_file, "the file holds no non-empty line")
    return prompts


def apply_chat(tokenizer, prompts: list[str]) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise bad_value("--chat", True, "this tokenizer has no chat template; drop --chat and give plain prompts")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def build_spec(args, num_layers: int) -> dict:
    if args.strategy == "speculative":
        return {"strategy": "speculative", "draft_layers": args.draft_layers or num_layers // 2,
                "num_draft": args.num_draft, "draft_threshold": args.draft_threshold,
                "draft_vocab": bool(args.draft_vocab)}
    if args.strategy == "full":
        return {"strategy": "full"}
    params = {"min_layer": args.min_layer, "decay": args.decay}
    if args.threshold is not None:
        params["threshold"] = args.threshold
    if args.exit_layers:
        params["exit_layers"] = int_list(args.exit_layers)
    return {"strategy": "early-exit", "rule": args.rule, "params": params, "kv": args.kv}


def train_and_save(args, lm, tokenizer):
    from ..generation.corpus import load_passages, token_blocks
    from ..generation.model import EarlyExitLM
    from ..generation.train import ExitTrainConfig, fit_shortcuts, train_exits

    layers = int_list(args.train_layers) if args.train_layers else None
    if args.adapter_kind == "linear" and not args.lora_rank:
        model = EarlyExitLM(lm, adapter_kind="linear", name=args.model)
        blocks = token_blocks(tokenizer, load_passages(args.corpus, "train"), args.seq_len,
                              max_blocks=args.steps * args.batch_size)
        print(f"fitted: {fit_shortcuts(model, blocks, layers)}", file=sys.stderr)
        model.config.training["corpus"] = args.corpus
        model.save_exits(args.train_exits)
        print(f"exits saved to {args.train_exits}", file=sys.stderr)
        return model
    model = EarlyExitLM(lm, adapter_rank=args.adapter_rank, name=args.model)
    blocks = token_blocks(tokenizer, load_passages(args.corpus, "train"), args.seq_len,
                          max_blocks=args.steps * args.batch_size)
    config = ExitTrainConfig(objective=args.objective, layers=layers,
                             steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora_rank=args.lora_rank,
                             lora_lr=args.lora_lr)
    train_exits(model, blocks, config, log=lambda s: print(s, file=sys.stderr))
    model.config.training["corpus"] = args.corpus
    model.save_exits(args.train_exits)
    print(f"exits saved to {args.train_exits}", file=sys.stderr)
    return model


def run(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from ..generation.corpus import frequent_tokens, load_passages, require_eos, token_blocks
    from ..evaluation.generation_report import write_generation_report
    from ..generation.evaluate import compare, run_spec
    from ..generation.loading import load_causal_lm
    from ..generation.model import EarlyExitLM
    from ..io import write_json_atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args) if (args.prompt or args.prompts_file or not args.train_exits) else []
    device, dtype = device_and_dtype(args)

    hf_logging.disable_progress_bar()  # keep stderr for our own messages
    lm, tokenizer = load_causal_lm(args.model, dtype=dtype or torch.float32)
    if args.train_exits:
        model = train_and_save(args, lm, tokenizer)
    elif args.exits:
        model = EarlyExitLM.with_exits(lm, args.exits, name=args.model)
    else:
        model = EarlyExitLM(lm, name=args.model)
    if not prompts:
        return 0
    model.merge_lora()  # decode at the plain model's cost: LoRA (if any) folded into the weights
    model.to(device)  # exits are trained and loaded on the CPU; decoding runs on --device
    draft_vocab = None
    if args.draft_vocab is not None:
        draft_vocab = frequent_tokens(token_blocks(tokenizer, load_passages(args.corpus, "train"), args.seq_len,
                                                   max_blocks=400), args.draft_vocab)
    if args.stop_at_eos:
        require_eos(tokenizer, "--stop-at-eos")
    if args.chat:
        prompts = apply_chat(tokenizer, prompts)
    spec = build_spec(args, model.num_layers)
    if args.evaluate:
        specs = [spec] + ([{"strategy": "hf"}] if args.compare_hf else [])
        payload = compare(model, tokenizer, prompts, specs, args.max_new_tokens, eos=args.stop_at_eos,
                          log=lambda s: print(s, file=sys.stderr), draft_vocab=draft_vocab)
        payload.update({"model": args.model, "exits": args.exits or args.train_exits})
        out = Path(args.output)
        write_json_atomic(out / "results.json", payload)
        print(write_generation_report(payload, out))
        return 0
    eos = tokenizer.eos_token_id if args.stop_at_eos else None
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        prompt_ids = ids[0].tolist()
        shown = tokenizer.decode(prompt_ids)  # decode prompt + continuation together: spacing stays right
        seen: list[int] = []
        printed = [len(shown)]

        def stream(token: int) -> None:
            seen.append(token)
            decoded = tokenizer.decode(prompt_ids + seen)
            sys.stdout.write(decoded[printed[0]:])
            sys.stdout.flush()
            printed[0] = len(decoded)

        if not args.no_stream:
            sys.stdout.write(shown)
        out = run_spec(model, ids, spec, args.max_new_tokens, eos, on_token=None if args.no_stream else stream,
                       draft_vocab=draft_vocab)
        if args.no_stream:
            sys.stdout.write(tokenizer.decode(prompt_ids + out.tokens))
        summary = {"tokens": len(out.tokens), "tokens_per_second": round(out.tokens_per_second, 2),
                   "avg_layers": round(out.avg_layers, 2), **{k: v for k, v in out.stats.items() if k != "params"}}
        sys.stdout.write("\n")
        print(json.dumps(summary), file=sys.stderr)
    return 0
