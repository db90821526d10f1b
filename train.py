"""
Supervised fine-tuning of Titan's arms on chain-of-thought traces; the backbone stays frozen.

The built-in demo (no --backbone) runs on a CPU in minutes and needs no network:
    python train.py --moe_scale 1.5
It pretrains a tiny Mamba on single-step arithmetic facts (once, cached in --out_dir), freezes it,
grafts the arms, trains them on multi-step problems and prints held-out accuracy with and
without the arms.

On a pretrained backbone in the state-spaces layout:
    python train.py --backbone path/to/mamba-130m --tokenizer r50k_base --data traces.jsonl

Data-parallel on N GPUs of one machine (each rank holds the frozen backbone; only the trainable
gradients are all-reduced):
    torchrun --nproc_per_node=N train.py --backbone state-spaces/mamba-1.4b --data traces.jsonl
"""

import argparse
import json
import math
import os
import pathlib
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import titan

# -----------------------------------------------------------------------------
# defaults: the built-in demo's, sized to finish in minutes on 2 CPU cores
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("model")
g.add_argument("--backbone", default=None, help="hub repo id (state-spaces/mamba-1.4b), or a local folder in the state-spaces "
               "or transformers layout; default: the built-in demo backbone, pretrained on first use")
g.add_argument("--tokenizer", default=None, help="'bytes', 'r50k_base' or a tokenizer.json path (default: bytes for the demo, "
               "else the tokenizer.json beside the backbone)")
g.add_argument("--force_tokenizer", action="store_true", help="pair a tokenizer whose size does not fit the backbone's embedding")
g.add_argument("--moe_scale", type=float, default=1.0, help="multiplier on the arms' output before it joins the residual stream")
g.add_argument("--d_bridge", type=int, default=None, help="width the arms work at (default 512; 32 for the demo)")
g.add_argument("--arm_d_state", type=int, default=None, help="d_state of each arm (default 16; 8 for the demo)")
g.add_argument("--n_arms", type=int, default=8, help="number of expert arms")
g.add_argument("--top_k", type=int, default=2, help="arms mixed in per token")
g.add_argument("--d_blackboard", type=int, default=None, help="width of the Blackboard bus (default 64; 16 for the demo)")
g.add_argument("--inject_layer", type=int, default=None, help="layer the arms feed into (default n_layer // 2)")
g.add_argument("--no_blackboard", action="store_true", help="switch the Blackboard off (ablation)")
g.add_argument("--load_balance_coef", type=float, default=0.01, help="weight of the router's load-balance loss")
g = parser.add_argument_group("data")
g.add_argument("--data", default=None, help="JSONL file of traces (default: built-in multi-step arithmetic)")
g.add_argument("--seq_len", type=int, default=256, help="maximum tokens per training sequence")
g.add_argument("--eval_problems", type=int, default=200, help="held-out problems for the final accuracy")
g = parser.add_argument_group("optimisation")
g.add_argument("--batch_size", type=int, default=16, help="sequences per micro-step")
g.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
g.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
g.add_argument("--min_lr", type=float, default=5e-4, help="learning rate at the end of the cosine decay")
g.add_argument("--warmup_steps", type=int, default=30, help="linear warmup steps")
g.add_argument("--max_steps", type=int, default=1600, help="optimizer steps")
g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
g = parser.add_argument_group("demo backbone pretraining (only without --backbone)")
g.add_argument("--pretrain_steps", type=int, default=500, help="steps of fact pretraining")
g.add_argument("--demo_d_model", type=int, default=64, help="d_model of the demo backbone")
g.add_argument("--demo_n_layer", type=int, default=4, help="n_layer of the demo backbone")
g.add_argument("--demo_d_state", type=int, default=8, help="d_state of the demo backbone")
g.add_argument("--demo_max_operand", type=int, default=10, help="operands of the demo problems stay below this")
g.add_argument("--demo_max_value", type=int, default=30, help="numbers in the demo stay below this")
g = parser.add_argument_group("run")
g.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available)")
g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
               help="storage dtype of the frozen weights (auto: bf16 on GPUs of compute capability >= 8, "
                    "fp16 on older GPUs, float32 on CPU)")
g.add_argument("--out_dir", default="out", help="folder for checkpoints and the demo backbone")
g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out_dir, exactly where it "
               "stopped (weights, optimizer, step, RNG states, data position)")
g.add_argument("--keep", type=int, default=None, help="checkpoints to keep: ckpt.pt is the newest; with N > 1 the N newest "
               "also stay as ckpt_{step}.pt (default 1, or the resumed run's value)")
g.add_argument("--stop_step", type=int, default=0, help="save and exit after this step, as an interruption would; the "
               "learning-rate schedule still runs to --max_steps (0: off)")
g.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="torch.distributed backend under torchrun "
               "(default: nccl on GPUs, gloo on CPU)")
g.add_argument("--dry_run", action="store_true", help="print the memory plan for the backbone and flags, then exit; "
               "downloads nothing")
g.add_argument("--vram_gb", type=float, default=None, help="memory budget the plan is checked against "
               "(default: the detected GPU's memory)")
g.add_argument("--log_interval", type=int, default=100, help="steps between log lines")
g.add_argument("--eval_interval", type=int, default=400, help="steps between held-out loss evaluations and checkpoints")
g.add_argument("--seed", type=int, default=1337, help="random seed")
g.add_argument("--max_bad_steps", type=int, default=5, help="non-finite steps in a row after which the run stops")
g.add_argument("--inject_nan_step", type=int, default=0, help="testing aid: make the loss NaN from this step on (0: off)")
args = parser.parse_args()


def fail(message):
    """Print a one-line error and exit without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "n_arms", "log_interval", "eval_interval",
             "max_bad_steps", "keep", "eval_problems", "d_bridge", "arm_d_state", "d_blackboard"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
        fail(f"--{name} {getattr(args, name)} must be at least 1")
for name in ("warmup_steps", "weight_decay", "grad_clip", "min_lr", "inject_nan_step", "load_balance_coef"):
    if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
        fail(f"--{name} {getattr(args, name)} must be a finite number >= 0")
if not math.isfinite(args.lr) or args.lr <= 0:
    fail(f"--lr {args.lr} must be a finite number > 0")
if args.stop_step > args.max_steps:
    fail(f"--stop_step {args.stop_step} is after --max_steps {args.max_steps}, so it would never stop the run")
if not args.out_dir:
    fail("--out_dir is empty; pass a folder for checkpoints, such as --out_dir out")
if not math.isfinite(args.moe_scale) or args.moe_scale < 0:
    fail(f"--moe_scale {args.moe_scale} must be a finite number >= 0")
if not 1 <= args.top_k <= args.n_arms:
    fail(f"--top_k {args.top_k} must be between 1 and --n_arms ({args.n_arms})")

if args.stop_step < 0:
    fail(f"--stop_step {args.stop_step} must be >= 0 (0: off)")

# -----------------------------------------------------------------------------
# data parallelism: torchrun sets these variables, and a plain `python train.py` is a world of one
world_size = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
local_rank = int(os.environ.get("LOCAL_RANK", "0"))
master = rank == 0                   # logs, evaluates and saves
log = print if master else (lambda *a, **k: None)

torch.manual_seed(args.seed)
random.seed(args.seed)
out_dir = pathlib.Path(args.out_dir)
if master:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        fail(f"--out_dir {out_dir} is not writable ({err.strerror}); pass a folder you can write to")
    if not args.resume and not args.dry_run and ((out_dir / titan.CHECKPOINT_NAME).exists()
                                                 or titan.numbered_checkpoints(out_dir)):
        fail(f"--out_dir {out_dir} already holds a checkpoint ({out_dir / titan.CHECKPOINT_NAME}), which a new run "
             "would overwrite; pass --resume to continue it, or another --out_dir")

# -----------------------------------------------------------------------------
# device and precision
if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
try:
    device = torch.device(args.device)
except RuntimeError:
    fail(f"--device {args.device} is not a device; pass cpu, cuda or cuda:N")
if device.type == "cuda" and not torch.cuda.is_available():
    fail(f"--device {args.device}: this torch build or machine has no CUDA GPU; pass --device cpu")
if device.type == "cuda" and world_size > 1:
    device = torch.device("cuda", local_rank)    # one GPU per rank
if world_size > 1 and not args.dry_run:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=args.backend or ("nccl" if device.type == "cuda" else "gloo"))
if args.dtype == "auto":
    if device.type == "cuda":
        # capability 8.0+ has bf16 in hardware; is_bf16_supported() also counts emulation
        args.dtype = "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
    else:
        args.dtype = "float32"
dtype = getattr(torch, args.dtype)
autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
            else torch.autocast(device.type, enabled=False))
scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

# -----------------------------------------------------------------------------
# --dry_run: the memory plan, from the backbone's shape alone


def planned_backbone_config():
    """Build the backbone's MambaConfig without downloading weights: demo, known hub id, or local config.json."""
    if args.backbone is None:
        return titan.MambaConfig(d_model=args.demo_d_model, n_layer=args.demo_n_layer, d_state=args.demo_d_state,
                                 vocab_size=256)
    if args.backbone in titan.KNOWN_BACKBONES:
        d_model, n_layer = titan.KNOWN_BACKBONES[args.backbone]
        return titan.MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277)
    config_path = pathlib.Path(args.backbone) / "config.json"
    if not config_path.is_file():
        fail(f"--dry_run: {config_path} not found, and {args.backbone} is not one of the known backbones "
             f"({', '.join(titan.KNOWN_BACKBONES)}); pass a local folder")
    config = titan._canonical_config(json.loads(config_path.read_text()), config_path)
    return titan.MambaConfig(**{k: v for k, v in config.items()})


if args.dry_run:
    bb = planned_backbone_config()
    demo_run = args.backbone is None
    plan_cfg = titan.TitanConfig(
        backbone=bb, inject_layer=args.inject_layer or 0, d_bridge=args.d_bridge or (32 if demo_run else 512),
        n_arms=args.n_arms, top_k=args.top_k, d_blackboard=args.d_blackboard or (16 if demo_run else 64),
        arm_d_state=args.arm_d_state or (8 if demo_run else 16), moe_scale=args.moe_scale)
    plan = titan.sft_memory_plan(plan_cfg, args.batch_size, args.seq_len, dtype)
    total = sum(plan.values())
    print(f"memory plan for one SFT step: {args.backbone or 'demo backbone'} (d_model {bb.d_model}, n_layer {bb.n_layer}), "
          f"frozen weights in {args.dtype}, batch {args.batch_size}, seq_len {args.seq_len}")
    for part, size in plan.items():
        print(f"  {part:<18} {size / 2**30:7.2f} GiB")
    print(f"  {'total':<18} {total / 2**30:7.2f} GiB  (an estimate; a measured step ran 8% above its plan)")
    budget = args.vram_gb
    if budget is None and device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory / 2**30
    if budget is not None and 1.1 * total / 2**30 > budget:
        print(f"warning: the plan plus a 10% margin ({1.1 * total / 2**30:.2f} GiB) exceeds the {budget:.1f} GiB "
              "budget; lower --seq_len or --batch_size and raise --grad_accum")
    sys.exit(0)

# -----------------------------------------------------------------------------
# the frozen backbone: loaded, or the demo's, pretrained once on arithmetic facts


def pretrain_demo_backbone(folder, tok):
    """Train a tiny Mamba on streams of facts such as "12+7=19" and save it to `folder`."""
    cfg = titan.MambaConfig(d_model=args.demo_d_model, n_layer=args.demo_n_layer, d_state=args.demo_d_state,
                            vocab_size=tok.n_vocab)
    lm = titan.MambaLM(cfg).to(device)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(args.seed)
    seq = 64
    log(f"pretraining the demo backbone ({sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M params) "
          f"on single-step facts for {args.pretrain_steps} steps")
    t0 = time.time()
    for step in range(1, args.pretrain_steps + 1):
        rows = []
        for _ in range(32):
            text = ""
            while len(text) < seq + 1:
                text += titan.arithmetic_fact(rng, args.demo_max_value) + "\n"
            rows.append(tok.encode(text)[:seq + 1])
        batch = torch.tensor(rows, device=device)
        lr = 3e-3 * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.pretrain_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        logits, _ = lm(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.pretrain_steps:
            log(f"pretrain {step}: loss {loss.item():.4f}, lr {lr:.2e}, {(time.time() - t0) / step * 1000:.0f}ms/step")
    titan.save_backbone(lm.cpu(), folder)
    log(f"saved the demo backbone to {folder} ({time.time() - t0:.0f}s)")


# under torchrun, the first rank of each machine downloads or pretrains, then the others read its copy
first_on_node = local_rank == 0
if world_size > 1 and not first_on_node:
    dist.barrier()
demo = args.backbone is None
if demo:
    backbone_dir = out_dir / "demo_backbone"
    source = "demo_backbone"         # stored relative to out_dir, so the folder can move
    default_tokenizer = "bytes"
else:
    try:
        backbone_dir = titan.resolve_backbone(args.backbone)
    except (FileNotFoundError, titan.DownloadError) as err:
        fail(str(err))
    source = args.backbone
    default_tokenizer = backbone_dir / "tokenizer.json"
    if not default_tokenizer.is_file():
        default_tokenizer = None
tok_name = args.tokenizer or (default_tokenizer and str(default_tokenizer))
if tok_name is None:
    fail(f"--backbone {args.backbone}: no tokenizer.json beside the weights; pass --tokenizer with the "
         "tokenizer.json the backbone was trained with (GPT-NeoX-20B's for state-spaces models)")
try:
    tok = titan.get_tokenizer(tok_name)
except (ValueError, OSError) as err:
    fail(f"--tokenizer: {err}")

if demo and not (backbone_dir / "pytorch_model.bin").is_file():
    pretrain_demo_backbone(backbone_dir, tok)
try:
    lm, _ = titan.load_backbone(backbone_dir, dtype=dtype, device=device, vocab_size=tok.n_vocab,
                                force_vocab=args.force_tokenizer)
except (ValueError, FileNotFoundError) as err:
    fail(str(err).replace(f"--backbone {backbone_dir}", f"--backbone {args.backbone or backbone_dir}"))
if world_size > 1 and first_on_node:
    dist.barrier()

# -----------------------------------------------------------------------------
# Titan: the arms grafted onto the frozen backbone
cfg = titan.TitanConfig(
    backbone=lm.cfg, inject_layer=args.inject_layer or 0,
    d_bridge=args.d_bridge or (32 if demo else 512), n_arms=args.n_arms, top_k=args.top_k,
    d_blackboard=args.d_blackboard or (16 if demo else 64), moe_scale=args.moe_scale,
    arm_d_state=args.arm_d_state or (8 if demo else 16),
    blackboard=not args.no_blackboard, load_balance_coef=args.load_balance_coef)
if args.inject_layer is not None and args.inject_layer < 1:     # 0 would silently mean the default
    fail(f"--inject_layer {args.inject_layer} is outside [1, {lm.cfg.n_layer - 1}]; pass a layer in that range, or "
         f"leave it out for n_layer // 2 = {lm.cfg.n_layer // 2}")
try:
    cfg.validate()
except ValueError as err:
    fail(str(err).replace("inject_layer", "--inject_layer", 1))
model = titan.Titan(cfg, lm).to(device)
trainable = model.trainable_parameters()
n_frozen = sum(p.numel() for p in model.lm.parameters())
log(f"Titan: frozen backbone {n_frozen / 1e6:.2f}M params ({args.dtype}), trainable {sum(p.numel() for p in trainable) / 1e6:.2f}M, "
      f"arms at layer {cfg.inject_layer}/{lm.cfg.n_layer}, moe_scale {cfg.moe_scale}")

# -----------------------------------------------------------------------------
# data: held-out problems first, so that the training stream can skip them
if args.data:
    try:
        records = titan.read_jsonl(args.data, log=log)
    except ValueError as err:
        fail(str(err))
    rng = random.Random(args.seed)
    rng.shuffle(records)
    n_eval = min(args.eval_problems, max(1, len(records) // 10))
    eval_records, train_records = records[:n_eval], records[n_eval:] or records
else:
    eval_rng = random.Random(args.seed + 1)
    eval_records = [titan.arithmetic_problem(eval_rng, eval_rng.choice([2, 3, 4]), args.demo_max_value,
                                             args.demo_max_operand)
                    for _ in range(args.eval_problems)]
    held_out = {r["question"] for r in eval_records}
    train_records = None


class ExampleStream:
    """Training examples in a resumable order.

    With a data file, each epoch visits its records in a fresh shuffled order. For the demo,
    each example is a new problem that is not held out. state_dict() contains the RNG, the
    epoch's order and the position in it. A resumed run therefore reads exactly the examples
    an uninterrupted run would have read. Every rank reads the same stream and takes its own
    slice of each batch (see the training loop).
    """

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.order, self.pos = [], 0
        self.stats = {"cut_tokens": 0, "cut_records": 0, "skipped": 0}

    def next_record(self):
        if train_records is None:
            while True:
                rec = titan.arithmetic_problem(self.rng, self.rng.choice([2, 3, 4]), args.demo_max_value,
                                               args.demo_max_operand)
                if rec["question"] not in held_out:
                    return rec
        if self.pos == len(self.order):
            self.order = list(range(len(train_records)))
            self.rng.shuffle(self.order)
            self.pos = 0
        self.pos += 1
        return train_records[self.order[self.pos - 1]]

    def next_example(self):
        """Return (ids, mask) of the next record that fits --seq_len. Longer reasoning is cut, with a warning."""
        attempts = 2 if train_records is None else len(train_records) + 1    # every record once, then give up
        for _ in range(attempts):
            rec = self.next_record()
            cut_before = self.stats["cut_tokens"]
            ex = titan.format_example(tok, rec, args.seq_len, stats=self.stats)
            if ex is None:
                if self.stats["skipped"] == 0:
                    log(f"warning: a record's prompt and answer alone are longer than --seq_len {args.seq_len} "
                        f"(question {rec['question'][:40]!r}); such records are skipped. Raise --seq_len to keep them",
                        file=sys.stderr)
                self.stats["skipped"] += 1
                continue
            if self.stats["cut_tokens"] > cut_before:
                if self.stats["cut_records"] == 0:
                    log(f"warning: a record is longer than --seq_len {args.seq_len} (question {rec['question'][:40]!r}); "
                        "the end of its reasoning is cut and its answer kept. Raise --seq_len to keep it whole",
                        file=sys.stderr)
                self.stats["cut_records"] += 1
            return ex
        fail(f"--seq_len {args.seq_len}: no record fits, because every prompt plus answer is longer; raise --seq_len")

    def state_dict(self):
        return {"rng": self.rng.getstate(), "order": list(self.order), "pos": self.pos, "stats": dict(self.stats)}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])
        self.order, self.pos, self.stats = list(state["order"]), state["pos"], dict(state["stats"])


def held_out_loss(n_batches=4):
    model.eval()
    examples = [titan.format_example(tok, r, args.seq_len) for r in eval_records]
    examples = [e for e in examples if e is not None][:n_batches * args.batch_size]
    total, count = 0.0, 0
    with torch.no_grad(), autocast:
        for s in range(0, len(examples), args.batch_size):
            x, y = titan.make_batch(examples[s:s + args.batch_size], tok.eot_id)
            logits, _, _ = model(x.to(device))
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += (y != -100).sum().item()
    model.train()
    return total / max(1, count)


# -----------------------------------------------------------------------------
# optimizer over the trainable tensors only, learning rate warmup then cosine decay
optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))


def get_lr(step):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


# -----------------------------------------------------------------------------
# checkpoints: everything a resumed run needs to continue bit for bit
ckpt_path = out_dir / titan.CHECKPOINT_NAME
step = 0
stream = ExampleStream(args.seed + 2)


def rng_states():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if device.type == "cuda" and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def config_differences(saved, current, prefix=""):
    """List 'name (checkpoint X, now Y)' for every config field that differs, backbone fields included."""
    differ = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differ += config_differences(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            differ.append(f"{prefix}{key} (checkpoint {a}, now {b})")
    return differ


# Flags that decide which examples come next and how they are batched. A resume with other
# values would read other data, so it is refused. Optimiser flags may change, with a warning.
DATA_FLAGS = ("data", "seq_len", "batch_size", "grad_accum", "seed", "demo_max_operand", "demo_max_value",
              "eval_problems")
SCHEDULE_FLAGS = ("lr", "min_lr", "warmup_steps", "max_steps", "weight_decay", "grad_clip")


def check_resume_args(saved, path):
    saved = dict(saved, world_size=saved.get("world_size", 1))
    now = dict(vars(args), world_size=world_size)
    differ = [f"--{k} (checkpoint {saved[k]}, now {now[k]})" for k in (*DATA_FLAGS, "world_size")
              if k in saved and saved[k] != now[k]]
    if differ:
        fail(f"--resume: {path} was trained with other data settings: {', '.join(differ)}; pass the same values "
             "(and the same number of ranks), or another --out_dir for a new run")
    changed = [f"--{k} {saved[k]} -> {now[k]}" for k in SCHEDULE_FLAGS if k in saved and saved[k] != now[k]]
    if changed:
        print(f"warning: resuming with {', '.join(changed)}; the run continues, but it will not match an "
              "uninterrupted one", file=sys.stderr)


if args.resume:
    ckpt = None
    if master:
        try:
            resumed_from, ckpt = titan.latest_checkpoint(out_dir, log=lambda m: print(m, file=sys.stderr))
        except ValueError as err:
            fail(f"--resume: {err}")
        differ = config_differences(ckpt["config"], cfg.to_dict())
        if differ:
            fail(f"--resume: {resumed_from} was trained with another config: {', '.join(differ)}; pass the flags "
                 "it was trained with, or another --out_dir for a new run")
        model.load_trainable_state_dict(ckpt["trainable"], source=str(resumed_from))
        check_resume_args(ckpt.get("args", {}), resumed_from)
    if world_size > 1:              # the other ranks may sit on machines without the file
        box = [ckpt]
        dist.broadcast_object_list(box, src=0)
        ckpt = box[0]
        model.load_trainable_state_dict(ckpt["trainable"])
    optimizer.load_state_dict(ckpt["optimizer"])
    step = ckpt["step"]
    if all(k in ckpt for k in ("scaler", "data", "rng")):
        scaler.load_state_dict(ckpt["scaler"])
        stream.load_state_dict(ckpt["data"])
        set_rng_states(ckpt["rng"])
    else:
        log("warning: this checkpoint comes from an older train.py without RNG and data-position state; the "
            "resumed run continues with fresh data, so it will not match an uninterrupted one exactly", file=sys.stderr)
    if args.keep is None:
        args.keep = ckpt.get("args", {}).get("keep") or 1
    log(f"resumed from {resumed_from if master else ckpt_path} at step {step}"
        + (" (the run is already complete; only the final evaluation runs)" if step >= args.max_steps else ""))
elif world_size > 1:
    for p in trainable:             # the same seed gave every rank the same arms, and this makes sure of it
        dist.broadcast(p.data, src=0)
args.keep = args.keep or 1
saved_step = step if args.resume else None
saved_path = resumed_from if args.resume and master else None
if args.stop_step and args.stop_step <= step:
    fail(f"--stop_step {args.stop_step} is not after the resumed step {step}; pass a later step, or 0 to run to "
         f"--max_steps {args.max_steps}")


def save_checkpoint():
    """Write the checkpoint on rank 0. A failed write (a full disk) warns and keeps the previous one."""
    global saved_step, saved_path
    if not master:
        return
    ckpt = {"format": titan.CHECKPOINT_FORMAT, "config": cfg.to_dict(), "trainable": model.trainable_state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "data": stream.state_dict(), "rng": rng_states(),
            "backbone": {"source": str(source), "demo": demo}, "tokenizer": tok_name,
            "args": dict(vars(args), world_size=world_size)}
    try:
        titan.save_checkpoint(ckpt, out_dir, keep=args.keep)
        saved_step, saved_path = step, ckpt_path
    except OSError as err:
        kept = f"the checkpoint of step {saved_step} is kept" if saved_step is not None else "no checkpoint is saved yet"
        print(f"warning: saving {ckpt_path} at step {step} failed ({err.strerror or err}); {kept}. Fix the cause "
              f"(a full disk, permissions, a folder named {titan.CHECKPOINT_NAME}); the run carries on", file=sys.stderr)


metrics_path = out_dir / "log.jsonl"


def log_metrics(**record):
    """Append one JSON line to out_dir/log.jsonl (exact floats, for plots and resume checks)."""
    global metrics_path
    if not master or metrics_path is None:
        return
    try:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        print(f"warning: writing {metrics_path} failed ({err.strerror}); metrics are no longer logged to it",
              file=sys.stderr)
        metrics_path = None


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM let the current step finish, then save and exit; a second one kills at once
stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)
    log(f"\n{stop_signal} received: saving after this step (send it again to quit without saving)", flush=True)


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)


def nonfinite_gradients():
    """Names of the trainable modules whose gradient has a NaN or Inf, e.g. 'arms.arms.3.mixer'."""
    return sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()})


def all_reduce_step(stats):
    """Average the trainable gradients over the ranks, in one flat all-reduce, and sum `stats`.

    The frozen backbone has no gradients, so this is the whole of data parallelism here:
    DistributedDataParallel would also broadcast and check the frozen weights, which this
    design never needs to send. It runs once per optimizer step, after the last micro-step.
    """
    grads = [p.grad for p in trainable if p.grad is not None]
    flat = torch.cat([g.flatten().float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    dist.all_reduce(stats)


# -----------------------------------------------------------------------------
# training loop. Each optimizer step reads grad_accum global batches of batch_size x world_size
# examples, and rank r trains on rows [r * batch_size, (r + 1) * batch_size) of each.
model.train()
bad_in_row = 0
t_last, tokens_since = time.time(), 0
log(f"SFT for {args.max_steps} steps, batch {args.batch_size} x {args.grad_accum}"
    + (f" x {world_size} ranks" if world_size > 1 else "") + f", lr {args.lr}")
while step < args.max_steps:
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batches = [[stream.next_example() for _ in range(args.batch_size * world_size)] for _ in range(args.grad_accum)]
    n_targets = sum(sum(mask[1:]) for batch in batches for _, mask in batch)
    ce_sum, aux_sum, usage = 0.0, 0.0, torch.zeros(cfg.n_arms)
    for batch in batches:
        x, y = titan.make_batch(batch[rank * args.batch_size:(rank + 1) * args.batch_size], tok.eot_id)
        x, y = x.to(device), y.to(device)
        probe = {}
        with autocast:
            ce, aux, _ = model(x, probe=probe, targets=y)
            # the mean over every target token of the step, on any rank and in any micro-step
            total = ce * (world_size / n_targets) + cfg.load_balance_coef * aux / args.grad_accum
            if args.inject_nan_step and step + 1 >= args.inject_nan_step:
                total = total * float("nan")
                ce = ce * float("nan")
        scaler.scale(total).backward()
        ce_sum += ce.item()
        aux_sum += aux.item() / args.grad_accum
        usage += (probe["gates"] > 0).float().flatten(0, 1).mean(0).cpu() / args.grad_accum
        tokens_since += x.numel() * world_size
    stats = torch.tensor([ce_sum, aux_sum, float(stop_signal is not None)], dtype=torch.float64)
    if world_size > 1:
        all_reduce_step(stats)
    loss_value, aux_value, stop_requested = stats[0].item() / n_targets, stats[1].item() / world_size, stats[2] > 0
    # a non-finite loss or gradient skips the update; fp16's GradScaler skips its own overflows
    bad = f"loss {loss_value}" if not math.isfinite(loss_value) else None
    if bad is None and not scaler.is_enabled() and nonfinite_gradients():
        bad = "gradient in " + ", ".join(nonfinite_gradients())
    if bad is not None:
        optimizer.zero_grad(set_to_none=True)
        bad_in_row += 1
        log(f"step {step + 1}: non-finite {bad}; step skipped ({bad_in_row} in a row)", file=sys.stderr)
        if bad_in_row >= args.max_bad_steps:
            fail(f"{bad_in_row} non-finite steps in a row, the last at step {step + 1}; stopped, and the last good "
                 f"checkpoint {ckpt_path} is kept. Lower --lr or check the data")
        continue
    bad_in_row = 0
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    step += 1

    if step % args.log_interval == 0 or step == args.max_steps:
        dt = time.time() - t_last
        n_logged = args.log_interval if step % args.log_interval == 0 else step % args.log_interval
        arms = " ".join(f"{u / cfg.top_k:.2f}" for u in usage.tolist())
        log(f"step {step}: loss {loss_value:.4f}, aux {aux_value:.3f}, lr {lr:.2e}, "
            f"{dt / n_logged * 1000:.0f}ms/step, {tokens_since / dt:.0f} tok/s, arms [{arms}]")
        log_metrics(step=step, loss=loss_value, aux=aux_value, lr=lr, ms_per_step=dt / n_logged * 1000)
        t_last, tokens_since = time.time(), 0
    stopping = stop_requested or step == args.stop_step
    if step % args.eval_interval == 0 or step == args.max_steps or stopping:
        if master:
            s = stream.stats
            cut = (f", {s['cut_records']} records cut by {s['cut_tokens']} reasoning tokens and {s['skipped']} "
                   f"skipped to fit --seq_len {args.seq_len}" if s["cut_records"] or s["skipped"] else "")
            heldout = held_out_loss()
            log(f"step {step}: held-out loss {heldout:.4f}{cut}")
            log_metrics(step=step, held_out_loss=heldout)
        save_checkpoint()
    if stopping:
        if world_size > 1:
            dist.destroy_process_group()
        if master and saved_step != step:
            fail(f"stopped at step {step}, but its save failed: the newest checkpoint holds step {saved_step}; "
                 f"fix the cause given above in --out_dir {out_dir}")
        why = stop_signal or ("a signal to another rank" if stop_requested else "--stop_step")
        log(f"{why}: saved {ckpt_path} at step {step}; continue with --resume")
        sys.exit(0)

# -----------------------------------------------------------------------------
# held-out accuracy with the arms switched off (the backbone alone) and on, on rank 0
if world_size > 1:
    dist.destroy_process_group()
if not master:
    sys.exit(0)
model.eval()
with autocast:
    for label, scale in (("backbone alone (moe_scale 0)", 0.0), (f"Titan (moe_scale {cfg.moe_scale})", None)):
        t0 = time.time()
        acc, results = titan.evaluate(model, tok, eval_records, max_new_tokens=min(args.seq_len, 96), moe_scale=scale)
        print(f"held-out accuracy, {label}: {acc:.1%} on {len(eval_records)} problems ({time.time() - t0:.0f}s)")
print(f"example: {eval_records[0]['question']} -> {results[0][1]!r}")
if saved_step == step:
    print(f"checkpoint: {saved_path}")
else:
    fail(f"the final save failed: the newest checkpoint holds step {saved_step}, not {step}; fix the cause given "
         f"above in --out_dir {out_dir} and rerun the last steps with --resume")
