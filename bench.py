"""
Benchmarks, each beside a baseline measured in the same run. Every figure is a median over
repeats after a warm-up; peak memory is measured in a fresh child process per case.

    python bench.py                  # scan, decode, sft
    python bench.py --scan --json bench.json
    python bench.py --memory         # one 1.4B-shape SFT step in bf16 on the CPU
    python bench.py --memory --memory_dtype float32   # the same in fp32, for CPUs without bf16
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import threading
import time

import torch

import titan


def rss_bytes():
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024        # Linux reports KiB


class PeakSampler:
    """Sample this process's RSS every 0.2 ms in a thread; `peak` is the largest value seen.

    Use it in a child started with in_child(..., track_memory=True), where the RSS follows the
    live tensors.
    NOTE: a peak shorter than the sampling interval can be missed.
    """

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def in_child(target, *args, track_memory=False):
    """Run target(*args) in a fresh process and return its result, so its peak RSS is its own.

    With track_memory, glibc in the child returns every block of 64 KiB or more to the system
    on free, so the RSS follows the live tensors. That costs page faults, so timings are taken
    in a child without it.
    """
    if track_memory:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)   # read by glibc when the child starts
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(target, args)


# -----------------------------------------------------------------------------
# scan: chunked scan vs the sequential reference, forward + backward


def scan_case(b, l, e, n, which, repeats, sample_memory=False):
    torch.manual_seed(0)
    u = torch.randn(b, l, e, requires_grad=True)
    delta = (torch.rand(b, l, e) * 0.1).requires_grad_()
    A = (-torch.rand(e, n) - 0.5).requires_grad_()
    B = torch.randn(b, l, n, requires_grad=True)
    C = torch.randn(b, l, n, requires_grad=True)
    inputs = (u, delta, A, B, C)
    # inputs, outputs (y and the final state) and the inputs' gradients, which backward returns
    io_bytes = 2 * sum(t.numel() * 4 for t in inputs) + b * l * e * 4 + b * e * n * 4
    scan = titan.selective_scan if which == "fast" else titan.selective_scan_ref

    def run():
        for t in inputs:
            t.grad = None           # so that backward's result becomes .grad, with no second copy
        y, h = scan(u, delta, A, B, C)
        (y.sum() + h.sum()).backward()

    run()                                                                    # warm-up
    if not sample_memory:           # the sampling thread would take one of the two cores
        return {"seconds": median_time(run, repeats, warmup=0), "io_bytes": io_bytes}
    for t in inputs:
        t.grad = None
    base = rss_bytes()
    with PeakSampler() as sampler:
        run()
    # what the scan held beyond its inputs (already in base), its outputs and the gradients
    produced = io_bytes - sum(t.numel() * 4 for t in inputs)
    return {"extra_peak_bytes": max(0, sampler.peak - base - produced), "io_bytes": io_bytes}


def bench_scan(args, results):
    # NOTE: the reference is timed on a prefix of ref_len steps and scaled linearly to the full
    # length, because its cost is one Python step per position and the full run takes minutes
    for b, l in ((1, 1024), (4, 256)):
        e, n = 1536, 16
        fast = in_child(scan_case, b, l, e, n, "fast", args.repeats)
        fast["extra_peak_bytes"] = in_child(scan_case, b, l, e, n, "fast", 1, True,
                                             track_memory=True)["extra_peak_bytes"]
        ref_len = l if args.full_reference else min(l, 128)
        ref = in_child(scan_case, b, ref_len, e, n, "ref", 1)
        ref_seconds = ref["seconds"] * l / ref_len
        row = {"shape": f"B={b} L={l} d_inner={e} d_state={n}", "fast_s": fast["seconds"], "reference_s": ref_seconds,
               "speedup": ref_seconds / fast["seconds"],
               "fast_extra_peak_vs_io": fast["extra_peak_bytes"] / fast["io_bytes"]}
        results.setdefault("scan", []).append(row)
        print(f"scan fwd+bwd {row['shape']}: fast {fast['seconds']:.3f}s, reference {ref_seconds:.1f}s"
              f"{'' if ref_len == l else f' (timed at L={ref_len}, scaled)'}, speed-up {row['speedup']:.0f}x, "
              f"fast extra peak {fast['extra_peak_bytes'] / 2**20:.0f} MiB = "
              f"{row['fast_extra_peak_vs_io']:.2f}x inputs+outputs")


# -----------------------------------------------------------------------------
# decode: greedy tokens/s at batch 1 vs the time to read every weight once


def model_130m(arms=True):
    torch.manual_seed(0)
    lm = titan.MambaLM(titan.MambaConfig(d_model=768, n_layer=24, vocab_size=50277))
    return titan.Titan(titan.TitanConfig(backbone=lm.cfg), lm).eval() if arms else lm


def decode_case(repeats):
    model = model_130m()
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)

    def read_all():
        for p in params:
            p.sum()
    read_s = median_time(read_all, repeats)

    def per_token_at(position, n_tokens=32):
        ids = torch.randint(0, 50277, (1, position))
        with torch.no_grad():
            logits, _, cache = model(ids)
            token = logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n_tokens):
                logits, _, cache = model(token, cache=cache)
                token = logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / n_tokens
    per_token_at(16, 4)                                                      # warm-up
    at16 = statistics.median(per_token_at(16) for _ in range(repeats))
    at2048 = statistics.median(per_token_at(2048) for _ in range(max(1, repeats // 2)))
    return {"weight_bytes": weight_bytes, "read_s": read_s, "token_s_16": at16, "token_s_2048": at2048}


def bench_decode(args, results):
    r = in_child(decode_case, args.repeats)
    row = {**r, "tokens_per_s": 1 / r["token_s_16"], "bound_tokens_per_s": 1 / r["read_s"],
           "fraction_of_bound": r["read_s"] / r["token_s_16"], "ratio_2048_to_16": r["token_s_2048"] / r["token_s_16"]}
    results["decode"] = row
    print(f"decode 130m shape + arms, batch 1: {row['tokens_per_s']:.1f} tok/s ({r['token_s_16'] * 1000:.1f} ms/token at "
          f"position 16, {r['token_s_2048'] * 1000:.1f} ms at 2048, ratio {row['ratio_2048_to_16']:.2f}); "
          f"reading {r['weight_bytes'] / 1e9:.2f} GB of weights takes {r['read_s'] * 1000:.1f} ms "
          f"(bound {row['bound_tokens_per_s']:.1f} tok/s): {row['fraction_of_bound']:.0%} of the bound")


# -----------------------------------------------------------------------------
# SFT step: 130m shape, frozen backbone, default arms, L=1024


def sft_case(seq_len, repeats, frozen_dtype_name):
    dtype = getattr(torch, frozen_dtype_name)
    base = rss_bytes()
    model = model_130m()
    model.cast_frozen(dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    ids = torch.randint(0, 50277, (1, seq_len + 1))
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            ce, aux, _ = model(ids[:, :-1], targets=ids[:, 1:])
            loss = ce / seq_len + 0.01 * aux
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = median_time(step, repeats)
    return {"seconds": seconds, "tokens_per_s": seq_len / seconds, "peak_bytes": peak_rss_bytes() - base}


def bench_sft(args, results):
    # each step takes tens of seconds on a CPU, so at most 3 timed repeats
    r = in_child(sft_case, 1024, min(args.repeats, 3), "float32")
    r["peak_bytes"] = in_child(sft_case, 1024, 1, "float32", track_memory=True)["peak_bytes"]
    results["sft"] = r
    print(f"SFT step, 130m shape frozen (fp32) + default arms, B=1 L=1024: {r['seconds']:.2f}s, "
          f"{r['tokens_per_s']:.0f} tok/s, peak {r['peak_bytes'] / 2**30:.2f} GiB above the empty process")


# -----------------------------------------------------------------------------
# memory: one 1.4B-shape SFT step in bf16 on the CPU, measured beside the plan


def memory_case(seq_len, d_model, n_layer, dtype_name):
    dtype = getattr(torch, dtype_name)
    cfg = titan.TitanConfig(backbone=titan.MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277))
    base = rss_bytes()
    with torch.device("meta"):
        lm = titan.MambaLM(cfg.backbone)
    lm = lm.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in lm.named_parameters():
            keep_fp32 = name.endswith(titan.FP32_PARAM_SUFFIXES)
            p.data = torch.empty(p.shape, dtype=torch.float32 if keep_fp32 else dtype).normal_(0, 0.02)
            if name.endswith("A_log"):
                p.data.copy_(torch.log(torch.arange(1, p.shape[1] + 1.0)).expand_as(p))
            if name.endswith("dt_proj.bias"):
                p.data.fill_(-4.0)
    model = titan.Titan(cfg, lm).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    ids = torch.randint(0, 50277, (1, seq_len + 1))
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        ce, aux, _ = model(ids[:, :-1], targets=ids[:, 1:])
        loss = ce / seq_len + 0.01 * aux
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    plan = titan.sft_memory_plan(cfg, 1, seq_len, dtype)
    return {"peak_bytes": peak_rss_bytes() - base, "plan": plan, "seconds": seconds}


def bench_memory(args, results):
    d_model, n_layer = titan.KNOWN_BACKBONES["state-spaces/mamba-1.4b"]
    r = in_child(memory_case, args.memory_seq_len, d_model, n_layer, args.memory_dtype)
    planned = sum(r["plan"].values())
    results["memory"] = {**r, "dtype": args.memory_dtype, "planned_bytes": planned,
                         "plan_error": planned / r["peak_bytes"] - 1}
    print(f"1.4B shape SFT step, {args.memory_dtype}, B=1 L={args.memory_seq_len} on the CPU ({r['seconds']:.0f}s): measured peak "
          f"{r['peak_bytes'] / 2**30:.2f} GiB, plan {planned / 2**30:.2f} GiB ({planned / r['peak_bytes'] - 1:+.0%})")
    for part, size in r["plan"].items():
        print(f"  plan: {part:<18} {size / 2**30:6.2f} GiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, text in (("scan", "chunked scan vs reference"), ("decode", "greedy decoding vs bandwidth bound"),
                       ("sft", "one SFT step of the 130m shape"), ("memory", "one 1.4B-shape SFT step vs the plan")):
        parser.add_argument(f"--{name}", action="store_true", help=f"run only the selected parts: {text}")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure")
    parser.add_argument("--full_reference", action="store_true", help="time the reference scan at full length (minutes)")
    parser.add_argument("--memory_seq_len", type=int, default=2048, help="sequence length of the --memory step")
    parser.add_argument("--memory_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="frozen-weight and compute dtype of the --memory step; float32 on CPUs without "
                             "native bf16, where a bf16 step takes hours")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be at least 1")

    chosen = [n for n in ("scan", "decode", "sft", "memory") if getattr(args, n)] or ["scan", "decode", "sft"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for name in chosen:
        globals()[f"bench_{name}"](args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
