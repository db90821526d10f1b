"""
Measure how a trained Titan behaves, on its checkpoint and on held-out problems:
termination geometry, PreNorm signal growth, attractor lock, the Blackboard and the router.
It prints the evidence; reading it is up to you.

    python inspect.py out/ckpt.pt
    python inspect.py out/ckpt.pt --sections geometry,attractor --json report.json
    python inspect.py out/ckpt_step400.pt out/ckpt.pt      # geometry as a trajectory
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

SECTIONS = ("geometry", "growth", "attractor", "blackboard", "router")
BAR = "█"


def bar(value, max_value, width=30):
    """Draw a horizontal bar, `width` characters at full scale."""
    n = 0 if max_value <= 0 else round(width * value / max_value)
    return BAR * max(0, min(width, n))


# -----------------------------------------------------------------------------
# metrics, each a plain function of tensors so that tests can check it on a known case


def row_norm_stats(weight, token_id):
    """Norm of one head row, its percentile (share of rows with a smaller norm, in %) and its
    rank (0 = smallest), with the mean, median and standard deviation of all row norms."""
    norms = weight.float().norm(dim=-1)
    value = norms[token_id]
    return {"norm": value.item(),
            "percentile": 100.0 * (norms < value).float().mean().item(),
            "rank": int((norms < value).sum().item()),
            "mean": norms.mean().item(), "median": norms.median().item(), "std": norms.std().item()}


def surviving_signal(final_with, final_without, logits_with, logits_without):
    """Measure how much of the arms' injection reaches the head: ||h_with - h_without|| / ||h_with||
    (mean over positions), and KL(p_with || p_without) of the next-token distributions."""
    share = ((final_with - final_without).norm(dim=-1) / final_with.norm(dim=-1).clamp(min=1e-12)).mean()
    log_p, log_q = logits_with.float().log_softmax(-1), logits_without.float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return share.item(), kl.item()


def routing_entropy(router_probs):
    """Mean entropy of the router's distribution per token, in nats."""
    return -(router_probs * router_probs.clamp(min=1e-12).log()).sum(-1).mean().item()


def cosine_matrix(vectors):
    """Pairwise cosine similarity of the rows of vectors (a, n)."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return unit @ unit.T


def lock_start(token_ids, cosines, threshold, max_period=8, min_repeats=4):
    """Return the generated-token index where an attractor lock began, or None.

    A generation is locked when it ends in a loop, a block of 1..max_period tokens repeated
    min_repeats times or more. The cosine similarity between consecutive hidden states must also
    stay above `threshold` from some step of that loop to the end, for at least min_repeats
    periods. The lock begins at the first such step. cosines[t] compares the hidden states of steps t-1, t.
    """
    loop = titan.find_loop(token_ids, max_period, min_repeats)
    if loop is None:
        return None
    period, start = loop
    for t in range(max(start, 1), len(cosines)):
        if len(token_ids) - t < period * min_repeats:
            return None
        if min(cosines[t:]) > threshold:
            return t
    return None


def think_steps(text):
    """Number of non-empty reasoning lines before </think> in a generation (None if never closed)."""
    if "</think>" not in text:
        return None
    reasoning = text.split("</think>", 1)[0].split("<think>", 1)[-1]
    return sum(1 for line in reasoning.split("\n") if line.strip())


# -----------------------------------------------------------------------------
# held-out problems


def held_out_records(ckpt, n):
    """Rebuild the held-out problems train.py evaluated on: its JSONL file's, or the demo's."""
    args = ckpt.get("args", {})
    if args.get("data"):
        records = titan.read_jsonl(args["data"])
        random.Random(args["seed"]).shuffle(records)
        return records[:n]
    rng = random.Random(args.get("seed", 1337) + 1)
    return [titan.arithmetic_problem(rng, rng.choice([2, 3, 4]), args.get("demo_max_value", 30),
                                    args.get("demo_max_operand", 10)) for _ in range(n)]


def reference_steps(record):
    return record.get("n_steps") or sum(1 for line in record["reasoning"].split("\n") if line.strip())


def generate_records(model, tok, records, max_new_tokens, **kwargs):
    """Greedy generations for each record's question, with per-step hidden-state cosines and
    per-layer SSM state norms. Returns a list of dicts."""
    prompts = [titan.question_prompt(tok, r["question"]) for r in records]
    ids = [[] for _ in records]
    done = [False] * len(records)
    cosines = [[0.0] for _ in records]
    state_norms = []                       # per step: (n_layer, batch)
    previous = None
    for next_ids, probe in titan.generate_stream(model, prompts, max_new_tokens, probe=True, **kwargs):
        hidden = probe["final_hidden"][:, -1].float()                         # (b, d)
        if previous is not None:
            cos = torch.nn.functional.cosine_similarity(hidden, previous, dim=-1)
            for i, c in enumerate(cos.tolist()):
                if not done[i]:
                    cosines[i].append(c)
        previous = hidden
        state_norms.append(torch.stack([s[1].flatten(1).norm(dim=-1) for s in probe["cache"]["layers"]]))
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:
                ids[i].append(t)
                done[i] = t == tok.eot_id
        if all(done):
            break
    out = []
    for i, r in enumerate(records):
        text = tok.decode(ids[i])
        answer = titan.extract_answer(text)
        out.append({"record": r, "ids": ids[i], "text": text, "correct": titan.grade(answer, r["answer"]),
                    "terminated": "</think>" in text and ids[i][-1:] == [tok.eot_id],
                    "think_steps": think_steps(text), "cosines": cosines[i],
                    "state_norms": torch.stack([s[:, i] for s in state_norms[:len(ids[i])]], dim=1)})
    return out


def sequence_loss(model, tok, records, **kwargs):
    examples = [e for e in (titan.format_example(tok, r, 512) for r in records) if e is not None]
    x, y = titan.make_batch(examples, tok.eot_id)
    with torch.no_grad():
        logits, _, _ = model(x, **kwargs)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100).item()


# -----------------------------------------------------------------------------
# report sections


def section_geometry(models, tok, records, x, report, args):
    print("\n== 1. Termination geometry: LM-head row norms ==")
    trajectory = []
    for path, model, ckpt in models:
        weight = model.head_weight()
        stats = {name: row_norm_stats(weight, token_id)
                 for name, token_id in (("</think>", tok.end_think_id), ("<think>", tok.think_id), ("<|end|>", tok.eot_id))}
        trajectory.append({"ckpt": path, "step": ckpt["step"], **stats})
    stats = trajectory[-1]
    rows = weight.shape[0]
    for name in ("</think>", "<think>", "<|end|>"):
        s = stats[name]
        print(f"{name:>9}: norm {s['norm']:.3f}, percentile {s['percentile']:5.1f}, rank {s['rank']} of {rows}")
    s = stats["</think>"]
    print(f"all rows: mean {s['mean']:.3f}, median {s['median']:.3f}, std {s['std']:.3f}")
    norms = weight.float().norm(dim=-1)
    order = norms.argsort()
    smallest = [(tok.decode_token(i), norms[i].item()) for i in order[:5].tolist()]
    largest = [(tok.decode_token(i), norms[i].item()) for i in order[-5:].flip(0).tolist()]
    print("smallest rows: " + ", ".join(f"{t!r} {n:.3f}" for t, n in smallest))
    print("largest rows:  " + ", ".join(f"{t!r} {n:.3f}" for t, n in largest))
    if len(trajectory) > 1:
        print("trajectory of </think>:")
        for t in trajectory:
            print(f"  step {t['step']:>6}: norm {t['</think>']['norm']:.3f}, percentile {t['</think>']['percentile']:5.1f}")

    # the logit margin at the positions where the reference trace closes its thinking
    model = models[-1][1]
    with torch.no_grad():
        logits, _, _ = model(x)
    target_positions = (x[:, 1:] == tok.end_think_id).nonzero()
    margins = []
    for b, t in target_positions.tolist():
        row = logits[b, t].float()
        other = torch.cat([row[:tok.end_think_id], row[tok.end_think_id + 1:]]).max()
        margins.append((row[tok.end_think_id] - other).item())
    margin_stats = {}
    if margins:
        m = torch.tensor(margins)
        q = torch.quantile(m, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist()
        margin_stats = {"min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4],
                        "positive_share": (m > 0).float().mean().item(), "count": len(margins)}
        print(f"</think> logit minus the best other logit where the reference closes ({len(margins)} positions): "
              f"min {q[0]:.2f}, quartiles {q[1]:.2f} / {q[2]:.2f} / {q[3]:.2f}, max {q[4]:.2f}; "
              f"positive at {margin_stats['positive_share']:.0%}")
    report["geometry"] = {**stats, "smallest_rows": smallest, "largest_rows": largest,
                          "trajectory": trajectory if len(trajectory) > 1 else [], "close_margin": margin_stats}


def section_growth(models, tok, records, x, report, args):
    model = models[-1][1]
    probe, probe_off = {}, {}
    with torch.no_grad():
        logits, _, _ = model(x, probe=probe)
        logits_off, _, _ = model(x, probe=probe_off, moe_scale=0.0)
    norms = torch.stack(probe["residual"])                                    # (n_layer + 1, b, l)
    mean, peak = norms.mean((1, 2)), norms.amax((1, 2))
    inject = model.cfg.inject_layer
    print("\n== 2. PreNorm signal growth: residual-stream norm per layer (held-out prompts) ==")
    for i in range(norms.shape[0]):
        label = "embedding" if i == 0 else f"layer {i - 1}"
        mark = "  <- arms injected before this layer" if i == inject else ""
        print(f"{label:>10}  mean {mean[i]:9.3f}  max {peak[i]:9.3f}  {bar(mean[i].item(), mean.max().item())}{mark}")
    growth = (mean[-1] / mean[0]).item()
    injected = probe["injected"].mean().item()
    residual = probe["residual_at_inject"].mean().item()
    ratio = injected / max(residual, 1e-12)
    share, kl = surviving_signal(probe["final_hidden"], probe_off["final_hidden"], logits, logits_off)
    print(f"growth from the embedding to the last layer: {growth:.1f}x")
    print(f"at the injection layer: arm signal (x moe_scale {model.moe_scale}) {injected:.4f}, residual "
          f"{residual:.4f}, ratio {ratio:.4f}")
    print(f"at the head: ||h_with_arms - h_without|| / ||h_with_arms|| = {share:.4f}, "
          f"KL(with || without) = {kl:.4f} nats per position")
    unscaled = injected / model.moe_scale if model.moe_scale > 0 else 0.0
    suggested = args.volume_fraction * residual / unscaled if unscaled > 0 else None
    if suggested is not None:
        print(f"volume matching: moe_scale {suggested:.3f} makes the injected norm {args.volume_fraction:.0%} "
              f"of the residual norm at the injection layer")
    report["growth"] = {"residual_mean": mean.tolist(), "residual_max": peak.tolist(), "growth_factor": growth,
                        "injected_norm": injected, "residual_at_inject": residual, "injected_ratio": ratio,
                        "surviving_share": share, "kl": kl, "volume_fraction": args.volume_fraction,
                        "suggested_moe_scale": suggested}


def section_attractor(models, tok, records, x, report, args):
    model = models[-1][1]
    print(f"\n== 3. Attractor lock: moe_scale sweep on {len(records)} held-out problems ==")
    print(f"{'moe_scale':>9} {'accuracy':>9} {'terminated':>11} {'looping':>8} {'median think':>13}")
    sweep, locked_example = [], None
    for scale in args.scales:
        gens = generate_records(model, tok, records, args.max_new_tokens, moe_scale=scale)
        n = len(gens)
        looping = [g for g in gens if titan.find_loop(g["ids"], 8, args.loop_repeats)]
        # think length: generated tokens before </think>, or all of them if it never came
        lengths = sorted(g["ids"].index(tok.end_think_id) if tok.end_think_id in g["ids"] else len(g["ids"])
                         for g in gens)
        row = {"moe_scale": scale, "accuracy": sum(g["correct"] for g in gens) / n,
               "termination_rate": sum(g["terminated"] for g in gens) / n,
               "repetition_rate": len(looping) / n, "median_think_length": lengths[n // 2]}
        locks = [(g, lock_start(g["ids"], g["cosines"], args.lock_cosine, 8, args.loop_repeats)) for g in looping]
        locks = [(g, start) for g, start in locks if start is not None]
        row["locked_rate"] = len(locks) / n
        # state saturation: per-layer SSM state norm at the first and last step, averaged over problems
        first = torch.stack([g["state_norms"][:, 0] for g in gens]).mean(0)
        last = torch.stack([g["state_norms"][:, -1] for g in gens]).mean(0)
        row["state_norm_first"], row["state_norm_last"] = first.tolist(), last.tolist()
        row["mean_consecutive_cosine"] = sum(sum(g["cosines"][1:]) / max(1, len(g["cosines"]) - 1) for g in gens) / n
        sweep.append(row)
        print(f"{scale:>9g} {row['accuracy']:>9.1%} {row['termination_rate']:>11.1%} {row['repetition_rate']:>8.1%} "
              f"{row['median_think_length']:>13}   locked {row['locked_rate']:.0%}")
        if locks and locked_example is None:
            g, start = locks[0]
            locked_example = {"moe_scale": scale, "question": g["record"]["question"], "text": g["text"], "lock_step": start}
    print("SSM state norm per layer, first -> last generated step (mean over problems):")
    for row in sweep:
        pairs = " ".join(f"{a:.1f}->{b:.1f}" for a, b in zip(row["state_norm_first"], row["state_norm_last"]))
        print(f"  moe_scale {row['moe_scale']:g}: {pairs}; consecutive hidden cosine {row['mean_consecutive_cosine']:.3f}")
    if locked_example:
        print(f"locked example (moe_scale {locked_example['moe_scale']:g}, lock from generated token "
              f"{locked_example['lock_step']}): {locked_example['question']} -> {locked_example['text'][:160]!r}")
    else:
        print(f"no locked generation (loop of {args.loop_repeats}+ repeats with hidden cosine > {args.lock_cosine})")
    report["attractor"] = {"sweep": sweep, "locked_example": locked_example, "lock_cosine": args.lock_cosine}


def section_blackboard(models, tok, records, x, report, args):
    model = models[-1][1]
    probe = {}
    with torch.no_grad():
        model(x, probe=probe, use_blackboard=True)
    active = probe["gates"] > 0                                               # (b, l, a)
    back = probe["readback"].norm(dim=-1)[active].mean().item()
    out = probe["arm_out"].norm(dim=-1)[active].mean().item()
    gates = probe["read_gate"].tolist()
    print("\n== 4. Blackboard ==")
    print(f"read-back norm {back:.4f} vs arm output norm {out:.4f}: ratio {back / max(out, 1e-12):.4f}"
          + ("" if model.use_blackboard else "  (the checkpoint was trained with the Blackboard off)"))
    print("read gates: " + " ".join(f"{g:.2f}" for g in gates))

    result = {"readback_norm": back, "arm_out_norm": out, "ratio": back / max(out, 1e-12), "read_gates": gates,
              "trained_with_blackboard": model.use_blackboard}
    figures = {}
    for label, on in (("on", True), ("off", False)):
        gens = generate_records(model, tok, records, args.max_new_tokens, use_blackboard=on)
        premature = sum(1 for g in gens if g["think_steps"] is not None
                        and g["think_steps"] < reference_steps(g["record"]) and not g["correct"])
        figures[label] = {"loss": sequence_loss(model, tok, records, use_blackboard=on),
                          "accuracy": sum(g["correct"] for g in gens) / len(gens),
                          "premature_rate": premature / len(gens)}
    delta = {k: figures["off"][k] - figures["on"][k] for k in figures["on"]}
    print(f"ablation on {len(records)} held-out problems (off minus on): loss {delta['loss']:+.4f} "
          f"({figures['on']['loss']:.4f} -> {figures['off']['loss']:.4f}), accuracy {delta['accuracy']:+.1%} "
          f"({figures['on']['accuracy']:.1%} -> {figures['off']['accuracy']:.1%}), premature termination "
          f"{delta['premature_rate']:+.1%} ({figures['on']['premature_rate']:.1%} -> {figures['off']['premature_rate']:.1%})")
    report["blackboard"] = {**result, "ablation": figures, "delta": delta}


def section_router(models, tok, records, x, report, args):
    model = models[-1][1]
    probe = {}
    with torch.no_grad():
        model(x, probe=probe)
    real = (x != tok.eot_id).flatten()
    gates, probs = probe["gates"].flatten(0, 1)[real], probe["router_probs"].flatten(0, 1)[real]   # (tokens, a)
    share = (gates > 0).float().mean(0) / model.cfg.top_k
    mean_gate = gates.sum(0) / (gates > 0).sum(0).clamp(min=1)
    entropy = routing_entropy(probs)
    print("\n== 5. Router: usage per arm (held-out tokens) ==")
    for i in range(model.cfg.n_arms):
        print(f"arm {i}: share {share[i]:.3f}  mean gate {mean_gate[i]:.3f}  {bar(share[i].item(), share.max().item())}")
    print(f"routing entropy {entropy:.3f} nats (uniform: {math.log(model.cfg.n_arms):.3f})")
    collapsed = share.max().item() > args.collapse_share
    if collapsed:
        print(f"warning: router collapse: arm {share.argmax().item()} takes {share.max().item():.0%} of the "
              f"routing slots (threshold {args.collapse_share:.0%})")
    arm_out = probe["arm_out"].flatten(0, 1)[real]                            # (tokens, a, c)
    sims = cosine_matrix(arm_out.permute(1, 0, 2).flatten(1))
    print("arm output cosine similarity:")
    print("      " + "".join(f"{j:>6}" for j in range(model.cfg.n_arms)))
    for i in range(model.cfg.n_arms):
        print(f"{i:>6}" + "".join(f"{sims[i, j].item():6.2f}" for j in range(model.cfg.n_arms)))
    report["router"] = {"share": share.tolist(), "mean_gate": mean_gate.tolist(), "entropy": entropy,
                        "collapsed": collapsed, "arm_cosine": sims.tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", help="checkpoint(s) written by train.py; the last one is measured in "
                        "full, and the geometry is shown across all of them")
    parser.add_argument("--n", type=int, default=32, help="held-out problems to measure on")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--scales", default="0,0.5,1,1.5,3,5", help="moe_scale values of the attractor sweep")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="tokens generated per problem at most")
    parser.add_argument("--loop_repeats", type=int, default=4, help="repeats of a 1..8-token block that count as a loop")
    parser.add_argument("--lock_cosine", type=float, default=0.95, help="hidden-state cosine above which a loop is a lock")
    parser.add_argument("--collapse_share", type=float, default=0.5, help="routing share of one arm that is a collapse")
    parser.add_argument("--volume_fraction", type=float, default=0.1, help="target injected/residual norm ratio")
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
        args.scales = [float(v) for v in args.scales.split(",")]
    except ValueError:
        parser.error(f"--scales {args.scales!r} must be comma-separated numbers such as 0,0.5,1")
    if any(not math.isfinite(v) or v < 0 for v in args.scales):
        parser.error(f"--scales {args.scales} must be finite numbers >= 0")

    models = []
    for path in args.ckpts:
        try:
            model, tok, ckpt = titan.load_titan(path, device=args.device)
        except (ValueError, FileNotFoundError, titan.DownloadError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        models.append((path, model, ckpt))
    path, model, ckpt = models[-1]
    print(f"checkpoint {path}: step {ckpt['step']}, arms at layer {model.cfg.inject_layer}/"
          f"{model.cfg.backbone.n_layer}, moe_scale {model.moe_scale}, backbone {ckpt['backbone']['source']}")
    try:
        records = held_out_records(ckpt, args.n)
    except ValueError as err:
        print(f"error: held-out problems: {err}", file=sys.stderr)
        sys.exit(2)
    examples = [e for e in (titan.format_example(tok, r, 512) for r in records) if e is not None]
    x, _ = titan.make_batch(examples, tok.eot_id)
    x = x.to(args.device)
    report = {"ckpts": args.ckpts, "step": ckpt["step"], "n": len(records)}
    for name in sections:
        globals()[f"section_{name}"](models, tok, records, x, report, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
