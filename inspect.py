"""
Measure how a trained Titan behaves: termination geometry, PreNorm signal growth, the router and
the Blackboard, on held-out problems.

    python inspect.py out/ckpt.pt
    python inspect.py out/ckpt.pt --sections geometry,growth --json report.json
"""

# This file is named inspect.py, like the standard-library module `inspect`. Python puts the
# script's folder first on sys.path, so every `import inspect` made by torch, dataclasses or pytest
# while running anything from this folder finds this file instead. When imported under that
# name, the file therefore replaces itself with the standard-library module and defines nothing.
import sys

if __name__ == "inspect":
    import importlib.machinery
    import importlib.util
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("inspect", _path)
    _stdlib_inspect = importlib.util.module_from_spec(_spec)
    sys.modules["inspect"] = _stdlib_inspect
    _spec.loader.exec_module(_stdlib_inspect)
else:
    import argparse
    import json
    import math
    import random

    import torch

    import titan

SECTIONS = ("geometry", "growth", "router", "blackboard")
BAR = "█"


def bar(value, max_value, width=30):
    """A horizontal bar of `width` characters at full scale."""
    n = 0 if max_value <= 0 else round(width * value / max_value)
    return BAR * max(0, min(width, n))


def row_norm_stats(weight, token_id):
    """Norm of one head row, its percentile (share of rows with a smaller norm, in %) and its
    rank (0 = smallest), with the mean, median and standard deviation of all row norms."""
    norms = weight.float().norm(dim=-1)
    value = norms[token_id]
    return {"norm": value.item(),
            "percentile": 100.0 * (norms < value).float().mean().item(),
            "rank": int((norms < value).sum().item()),
            "mean": norms.mean().item(), "median": norms.median().item(), "std": norms.std().item()}


def held_out_records(ckpt, n):
    """The held-out problems train.py evaluated on: its JSONL file's, or the demo's."""
    args = ckpt.get("args", {})
    if args.get("data"):
        records = titan.read_jsonl(args["data"])
        random.Random(args["seed"]).shuffle(records)
        return records[:n]
    rng = random.Random(args.get("seed", 1337) + 1)
    return [titan.arithmetic_problem(rng, rng.choice([2, 3, 4]), args.get("demo_max_value", 30),
                                    args.get("demo_max_operand", 10)) for _ in range(n)]


def held_out_batch(tok, records, seq_len=256):
    examples = [e for e in (titan.format_example(tok, r, seq_len) for r in records) if e is not None]
    return titan.make_batch(examples, tok.eot_id)


def section_geometry(model, tok, report):
    weight = model.head_weight()
    print("\n== Termination geometry: LM-head row norms ==")
    stats = {}
    for name, token_id in (("</think>", tok.end_think_id), ("<think>", tok.think_id), ("<|end|>", tok.eot_id)):
        s = row_norm_stats(weight, token_id)
        stats[name] = s
        print(f"{name:>9}: norm {s['norm']:.3f}, percentile {s['percentile']:.1f}, rank {s['rank']} of {weight.shape[0]}")
    s = stats["</think>"]
    print(f"all rows: mean {s['mean']:.3f}, median {s['median']:.3f}, std {s['std']:.3f}")
    report["geometry"] = stats


def section_growth(model, tok, x, report):
    probe = {}
    with torch.no_grad():
        model(x, probe=probe)
    norms = torch.stack(probe["residual"])                                    # (n_layer + 1, b, l)
    mean, peak = norms.mean((1, 2)), norms.amax((1, 2))
    inject = model.cfg.inject_layer
    print("\n== PreNorm signal growth: residual-stream norm per layer (held-out prompts) ==")
    for i in range(norms.shape[0]):
        label = "embedding" if i == 0 else f"layer {i - 1}"
        mark = "  <- arms injected before this layer" if i == inject else ""
        print(f"{label:>10}  mean {mean[i]:8.3f}  max {peak[i]:8.3f}  {bar(mean[i].item(), mean.max().item())}{mark}")
    growth = (mean[-1] / mean[0]).item()
    injected = probe["injected"].mean().item()
    residual = probe["residual_at_inject"].mean().item()
    print(f"growth from embedding to the last layer: {growth:.1f}x")
    print(f"at the injection layer: arm signal (x moe_scale {model.moe_scale}) {injected:.4f}, "
          f"residual {residual:.4f}, ratio {injected / max(residual, 1e-12):.4f}")
    report["growth"] = {"residual_mean": mean.tolist(), "residual_max": peak.tolist(), "growth_factor": growth,
                        "injected_norm": injected, "residual_at_inject": residual,
                        "injected_ratio": injected / max(residual, 1e-12)}


def section_router(model, tok, x, report):
    probe = {}
    with torch.no_grad():
        model(x, probe=probe)
    gates, probs = probe["gates"].flatten(0, 1), probe["router_probs"].flatten(0, 1)   # (tokens, a)
    share = (gates > 0).float().mean(0) / model.cfg.top_k
    mean_gate = gates.sum(0) / (gates > 0).sum(0).clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean().item()
    print("\n== Router: usage per arm (held-out tokens) ==")
    for i in range(model.cfg.n_arms):
        print(f"arm {i}: share {share[i]:.3f}  mean gate {mean_gate[i]:.3f}  {bar(share[i].item(), share.max().item())}")
    print(f"routing entropy {entropy:.3f} nats (uniform: {math.log(model.cfg.n_arms):.3f})")
    report["router"] = {"share": share.tolist(), "mean_gate": mean_gate.tolist(), "entropy": entropy}


def section_blackboard(model, tok, x, report):
    probe = {}
    with torch.no_grad():
        model(x, probe=probe, use_blackboard=True)
    active = probe["gates"] > 0                                               # (b, l, a)
    back = probe["readback"].norm(dim=-1)[active].mean().item()
    out = probe["arm_out"].norm(dim=-1)[active].mean().item()
    gates = probe["read_gate"].tolist()
    print("\n== Blackboard ==")
    print(f"read-back norm {back:.4f} vs arm output norm {out:.4f}: ratio {back / max(out, 1e-12):.4f}"
          + ("" if model.use_blackboard else "  (the checkpoint was trained with the Blackboard off)"))
    print("read gates: " + " ".join(f"{g:.2f}" for g in gates))
    report["blackboard"] = {"readback_norm": back, "arm_out_norm": out, "ratio": back / max(out, 1e-12),
                            "read_gates": gates, "trained_with_blackboard": model.use_blackboard}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint written by train.py")
    parser.add_argument("--n", type=int, default=32, help="held-out problems to measure on")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda', ...")
    args = parser.parse_args()

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.n < 1:
        parser.error(f"--n {args.n} must be at least 1")
    try:
        model, tok, ckpt = titan.load_titan(args.ckpt, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    print(f"checkpoint {args.ckpt}: step {ckpt['step']}, arms at layer {model.cfg.inject_layer}/"
          f"{model.cfg.backbone.n_layer}, moe_scale {model.moe_scale}, backbone {ckpt['backbone']['source']}")
    records = held_out_records(ckpt, args.n)
    x, _ = held_out_batch(tok, records)
    x = x.to(args.device)
    report = {"ckpt": args.ckpt, "step": ckpt["step"]}
    for name in sections:
        if name == "geometry":
            section_geometry(model, tok, report)
        else:
            globals()[f"section_{name}"](model, tok, x, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
