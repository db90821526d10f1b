"""
Generate from a trained Titan checkpoint with the recurrent step (the prompt is processed once).

    python sample.py --prompt "12+7-5"              # the question, in the training template
    python sample.py --raw --prompt "3+4=" --max_new_tokens 8
    python sample.py --prompt "12+7-5" --moe_scale 0   # the backbone alone
"""

import argparse
import sys

import torch

import titan

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
parser.add_argument("--prompt", default="12+7-5", help="the question (or, with --raw, the exact text to continue)")
parser.add_argument("--raw", action="store_true", help="pass --prompt unchanged instead of applying the template")
parser.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
parser.add_argument("--max_len", type=int, default=None, help="budget of prompt plus generated tokens (default: the "
                    "--seq_len the checkpoint was trained at; the arms never saw positions beyond it)")
parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
parser.add_argument("--repetition_penalty", type=float, default=1.0, help="divide logits of already emitted tokens by this (1: off)")
parser.add_argument("--moe_scale", type=float, default=None, help="override the checkpoint's moe_scale (0: backbone alone)")
parser.add_argument("--no_blackboard", action="store_true", help="switch the Blackboard off")
parser.add_argument("--no_guard", action="store_true", help="keep going when the output falls into a repeating loop")
parser.add_argument("--guard_repeats", type=int, default=6, help="repeats of a 1..8-token block that count as a loop")
parser.add_argument("--show_state", action="store_true", help="print per-token telemetry: top arm, its gate, SSM state norm")
parser.add_argument("--seed", type=int, default=1337, help="random seed for sampling")
parser.add_argument("--device", default="cpu", help="'cpu', 'cuda', ...")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the frozen weights")
args = parser.parse_args()


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if not args.prompt:
    fail("--prompt is empty; pass a question such as --prompt \"12+7-5\"")
if args.max_new_tokens < 1:
    fail(f"--max_new_tokens {args.max_new_tokens} must be at least 1")
if args.max_len is not None and args.max_len < 2:
    fail(f"--max_len {args.max_len} must be at least 2")
if args.temperature < 0:
    fail(f"--temperature {args.temperature} must be >= 0")
if not 0 < args.top_p <= 1:
    fail(f"--top_p {args.top_p} must be in (0, 1]")
if args.moe_scale is not None and not (args.moe_scale >= 0 and args.moe_scale != float("inf")):
    fail(f"--moe_scale {args.moe_scale} must be a finite number >= 0")
if args.top_k < 0:
    fail(f"--top_k {args.top_k} must be >= 0 (0: all tokens)")
if args.guard_repeats < 2:
    fail(f"--guard_repeats {args.guard_repeats} must be at least 2 (one occurrence is not a loop)")
if args.repetition_penalty <= 0:
    fail(f"--repetition_penalty {args.repetition_penalty} must be > 0")

torch.manual_seed(args.seed)
dtype = getattr(torch, args.dtype)
try:
    model, tok, ckpt = titan.load_titan(args.ckpt, device=args.device, dtype=dtype)
except (ValueError, FileNotFoundError) as err:
    fail(str(err))

prompt = tok.encode(args.prompt) if args.raw else titan.question_prompt(tok, args.prompt)
budget = args.max_len or ckpt.get("args", {}).get("seq_len") or len(prompt) + args.max_new_tokens
if len(prompt) >= budget:
    fail(f"--prompt is {len(prompt)} tokens, which leaves no room in the budget of {budget} tokens "
         f"({'--max_len' if args.max_len else 'the --seq_len the checkpoint was trained at'}); shorten the prompt, "
         "or raise --max_len if you accept positions the arms were not trained on")
if len(prompt) + args.max_new_tokens > budget:
    args.max_new_tokens = budget - len(prompt)
    print(f"note: --max_new_tokens lowered to {args.max_new_tokens} to stay within the budget of {budget} tokens "
          f"({'--max_len' if args.max_len else 'the training --seq_len; --max_len raises it'})", file=sys.stderr)
print(args.prompt if args.raw else titan.PROMPT_TEMPLATE.format(question=args.prompt), end="", flush=True)

generator = torch.Generator(device=args.device).manual_seed(args.seed)
autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
ids, printed = [], ""
with autocast:
    stream = titan.generate_stream(
        model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, moe_scale=args.moe_scale,
        use_blackboard=False if args.no_blackboard else None, probe=args.show_state, generator=generator)
    for next_ids, probe in stream:
        t = next_ids.item()
        ids.append(t)
        if t == tok.eot_id:
            break
        if t == tok.think_id:
            print("\n[thinking]", end="")
        elif t == tok.end_think_id:
            print("\n[answer]", end="")
        text = tok.decode([i for i in ids if i < tok.n_vocab])
        if not text.endswith("\ufffd"):             # wait for the rest of a multi-byte character
            print(text[len(printed):], end="", flush=True)
            printed = text
        if args.show_state:
            gates = probe["gates"][0, -1]
            ssm_state = probe["cache"]["layers"][model.cfg.inject_layer][1]
            print(f"  [arm {gates.argmax().item()} gate {gates.max().item():.2f} "
                  f"|h| {ssm_state.norm().item():.2f}]", end="")
        loop = None if args.no_guard else titan.find_loop(ids, max_period=8, min_repeats=args.guard_repeats)
        if loop:
            period, start = loop
            print(f"\n[stopped: attractor lock, a loop of period {period} repeating since generated token {start}; "
                  "--no_guard turns this check off]", end="")
            break
print()
answer = titan.extract_answer(tok.decode(ids))
if not args.raw and answer is None:
    print("[no answer: the model did not close </think>]")
