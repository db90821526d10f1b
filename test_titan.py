"""Tests for Titan. Run from the project root: python -m pytest -q"""

import json
import math
import os
import pathlib
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import titan

ROOT = pathlib.Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"


def tiny_backbone(seed=0, d_model=32, n_layer=4, vocab_size=256, d_state=8):
    torch.manual_seed(seed)
    return titan.MambaLM(titan.MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, d_state=d_state))


def tiny_titan(seed=0, **kwargs):
    lm = tiny_backbone(seed)
    cfg = titan.TitanConfig(backbone=lm.cfg, d_bridge=16, d_blackboard=8, arm_d_state=4, **kwargs)
    return titan.Titan(cfg, lm)


def scan_inputs(b, l, e, n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, e, generator=g, dtype=dtype)
    delta = torch.rand(b, l, e, generator=g, dtype=dtype) * 0.5
    A = -torch.rand(e, n, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, l, n, generator=g, dtype=dtype)
    C = torch.randn(b, l, n, generator=g, dtype=dtype)
    h0 = torch.randn(b, e, n, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, h0)]


# ---------------------------------------------------------------------------------------------
# selective scan


def explicit_scan(u, delta, A, B, C, h0):
    """The scan as an explicit sum over past positions (no recurrence), in float64:
    y_t = C_t · (exp(Σ_{r≤t} Δ_r A) h0 + Σ_{s≤t} exp(Σ_{s<r≤t} Δ_r A) Δ_s B_s u_s)."""
    log_decay = torch.cumsum(delta[..., None] * A, dim=1)                     # (b, l, e, n)
    b, l, e = u.shape
    y = torch.zeros(b, l, e, dtype=u.dtype)
    for t in range(l):
        h = torch.exp(log_decay[:, t]) * h0
        for s in range(t + 1):
            h = h + torch.exp(log_decay[:, t] - log_decay[:, s]) * (delta[:, s] * u[:, s])[..., None] * B[:, s, None, :]
        y[:, t] = (h * C[:, t, None, :]).sum(-1)
    return y


def test_reference_scan_matches_explicit_sum():
    u, delta, A, B, C, h0 = (t.detach() for t in scan_inputs(2, 9, 3, 4))
    y_ref, _ = titan.selective_scan_ref(u, delta, A, B, C, h0)
    y_explicit = explicit_scan(u, delta, A, B, C, h0)
    assert torch.allclose(y_ref, y_explicit, atol=1e-10), (y_ref - y_explicit).abs().max()


@pytest.mark.parametrize("length", [1, 13, 100])
@pytest.mark.parametrize("chunk", [8, 64])
def test_fast_scan_matches_reference(length, chunk):
    inputs = scan_inputs(2, length, 5, 4)
    y_ref, h_ref = titan.selective_scan_ref(*inputs)
    y_fast, h_fast = titan.selective_scan(*inputs, chunk=chunk)
    assert torch.allclose(y_fast, y_ref, atol=1e-12), f"y differs by {(y_fast - y_ref).abs().max()}"
    assert torch.allclose(h_fast, h_ref, atol=1e-12), f"final state differs by {(h_fast - h_ref).abs().max()}"

    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    names = ["u", "delta", "A", "B", "C", "h0"]
    g_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), inputs)
    g_fast = torch.autograd.grad((y_fast * gy).sum() + (h_fast * gh).sum(), inputs)
    for name, a, b in zip(names, g_ref, g_fast):
        assert torch.allclose(a, b, atol=1e-10), f"gradient of {name} differs by {(a - b).abs().max()}"


def test_fast_scan_passes_gradcheck():
    inputs = scan_inputs(1, 7, 2, 3)
    assert torch.autograd.gradcheck(lambda *t: titan.selective_scan(*t, chunk=3), inputs)


def test_fast_scan_state_stays_fp32_under_bf16_autocast():
    # a state that barely decays over 3000 steps: a bf16 state would lose the early inputs
    u, delta, A, B, C, h0 = (t.detach().float() for t in scan_inputs(1, 3000, 4, 2, seed=3))
    A = torch.full_like(A, -1e-4)
    delta = delta * 0.01
    y_ref, h_ref = titan.selective_scan_ref(u, delta, A, B, C, h0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast, h_fast = titan.selective_scan(u.bfloat16(), delta, A, B, C, h0)
    assert h_fast.dtype == torch.float32, h_fast.dtype
    assert y_fast.dtype == torch.float32, y_fast.dtype
    # the only bf16 rounding is of u itself, so the error stays at bf16 precision of the inputs
    rel = (h_fast - h_ref).norm() / h_ref.norm()
    assert rel < 1e-2, f"final state relative error {rel}"


# ---------------------------------------------------------------------------------------------
# Mamba block and backbone


def test_mixer_initialisation():
    mixer = titan.MambaMixer(d_model=40, d_state=6)
    dt = F.softplus(mixer.dt_proj.bias)
    assert mixer.dt_rank == math.ceil(40 / 16), mixer.dt_rank
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001, (dt.min(), dt.max())
    assert torch.equal(mixer.A_log[0], torch.log(torch.arange(1, 7.0))), mixer.A_log[0]
    assert torch.equal(mixer.D, torch.ones(80))


def test_backbone_init_keeps_dt_bias():
    lm = tiny_backbone()
    for layer in lm.layers:
        dt = F.softplus(layer.mixer.dt_proj.bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001, (dt.min(), dt.max())


def test_rmsnorm_matches_torch():
    norm = titan.RMSNorm(12)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, 12)
    expected = F.rms_norm(x, (12,), norm.weight, eps=1e-5)
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_mixer_conv_is_causal_depthwise():
    # changing input position t may only change outputs at positions >= t
    torch.manual_seed(0)
    mixer = titan.MambaMixer(d_model=8, d_state=4)
    x = torch.randn(1, 10, 8)
    y, _ = mixer(x)
    x2 = x.clone()
    x2[0, 6] += 1.0
    y2, _ = mixer(x2)
    assert torch.equal(y[0, :6], y2[0, :6]), "a future input changed a past output"
    assert not torch.equal(y[0, 6:], y2[0, 6:]), "the changed input had no effect"


@pytest.mark.parametrize("prompt_len", [1, 2, 3, 4, 5, 17])
def test_step_equals_forward(prompt_len):
    model = tiny_titan().eval()
    with torch.no_grad():
        # a large dt bias makes a missing or doubled bias change the output visibly
        for layer in list(model.lm.layers) + [arm for arm in model.arms.arms]:
            layer.mixer.dt_proj.bias.fill_(2.0)
        torch.nn.init.normal_(model.arms.up.weight, std=0.2)
    ids = torch.randint(0, model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _, _ = model(ids)
        logits, _, cache = model(ids[:, :prompt_len])
        stepped = [logits]
        for t in range(prompt_len, ids.shape[1]):
            logits, _, cache = model(ids[:, t:t + 1], cache=cache)
            stepped.append(logits)
    stepped = torch.cat(stepped, dim=1)
    assert torch.allclose(stepped, full, atol=1e-5), (stepped - full).abs().max()


def test_step_uses_dt_bias_once():
    # Δ from the shared path must equal softplus(W dt + bias), computed by hand
    mixer = titan.MambaMixer(d_model=16, d_state=4)
    with torch.no_grad():
        mixer.dt_proj.bias.fill_(3.0)
    x = torch.randn(1, 1, mixer.d_inner)
    delta, _, _ = mixer.ssm_params(x)
    dt = mixer.x_proj(x)[..., :mixer.dt_rank]
    expected = F.softplus(dt @ mixer.dt_proj.weight.T + 3.0)
    assert torch.allclose(delta, expected, atol=1e-6)


def test_padded_vocab():
    cfg = titan.MambaConfig(d_model=16, n_layer=1, vocab_size=50277)
    assert cfg.padded_vocab_size == 50280


# ---------------------------------------------------------------------------------------------
# Titan


def test_fresh_titan_equals_backbone():
    model = tiny_titan().eval()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = model.lm(ids)
        got, _, _ = model(ids, moe_scale=5.0)
    assert torch.equal(got[..., :256], expected[..., :256])


def test_titan_logits_cover_real_ids_only():
    model = tiny_titan().eval()
    logits, _, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape[-1] == 256 + 3 == model.vocab_size


def test_nonzero_up_projection_changes_logits():
    model = tiny_titan().eval()
    torch.nn.init.normal_(model.arms.up.weight, std=0.2)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        base, _, _ = model(ids, moe_scale=0.0)
        grafted, _, _ = model(ids, moe_scale=1.0)
    assert not torch.allclose(base, grafted)


def test_frozen_weights_stay_frozen():
    model = tiny_titan()
    model.train()
    frozen_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    trainable_ids = {id(p) for p in model.trainable_parameters()}
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(id(p) in trainable_ids for p in in_optimizer)
    assert all(p.requires_grad for p in in_optimizer)
    assert not any(p.requires_grad for p in model.lm.parameters())

    ids = torch.randint(0, model.vocab_size, (2, 16))
    for _ in range(3):
        logits, aux, _ = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for k, v in model.lm.state_dict().items():
        assert torch.equal(v, frozen_before[k]), f"frozen weight {k} changed"
    assert not torch.equal(model.arms.up.weight, torch.zeros_like(model.arms.up.weight)), "arms did not train"


def test_checkpointing_gives_same_gradients():
    model = tiny_titan()
    torch.nn.init.normal_(model.arms.up.weight, std=0.1)
    ids = torch.randint(0, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (True, False):
        model.checkpointing = checkpointing
        model.zero_grad()
        logits, aux, _ = model(ids)
        (F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:
        assert grads[0][k].abs().sum() > 0 or k == "special", f"no gradient reached {k}"
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), f"gradient of {k} differs with checkpointing"


def test_load_balance_loss_limits():
    n = 8
    uniform = torch.full((64, n), 1.0 / n)
    even_choice = torch.arange(64).remainder(n)[:, None]
    assert titan.load_balance_loss(uniform, even_choice, n).item() == pytest.approx(1.0, abs=1e-6)
    one_arm = F.one_hot(torch.zeros(64, dtype=torch.long), n).float()
    assert titan.load_balance_loss(one_arm, torch.zeros(64, 1, dtype=torch.long), n).item() == pytest.approx(n)


def test_blackboard_off_changes_output_and_gate_starts_open():
    model = tiny_titan().eval()
    torch.nn.init.normal_(model.arms.up.weight, std=0.2)
    assert torch.all(torch.sigmoid(model.arms.blackboard.read_gate) > 0.9)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        on, _, _ = model(ids, use_blackboard=True)
        off, _, _ = model(ids, use_blackboard=False)
    assert not torch.allclose(on, off)


def test_config_validation_names_the_field():
    lm = tiny_backbone()
    with pytest.raises(ValueError, match="top_k 9"):
        titan.TitanConfig(backbone=lm.cfg, top_k=9).validate()
    with pytest.raises(ValueError, match="inject_layer 4"):
        titan.TitanConfig(backbone=lm.cfg, inject_layer=4).validate()
    with pytest.raises(ValueError, match="moe_scale nan"):
        titan.TitanConfig(backbone=lm.cfg, moe_scale=float("nan")).validate()


# ---------------------------------------------------------------------------------------------
# loading and checkpoints


def test_state_spaces_layout_roundtrip(tmp_path):
    lm = tiny_backbone()
    titan.save_backbone(lm, tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    mixer_keys = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                  "dt_proj.bias", "A_log", "D", "out_proj.weight"]
    expected = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in range(lm.cfg.n_layer):
        expected.add(f"backbone.layers.{i}.norm.weight")
        expected.update(f"backbone.layers.{i}.mixer.{k}" for k in mixer_keys)
    assert set(state) == expected
    loaded, _ = titan.load_backbone(tmp_path)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], lm(ids)[0])


def test_load_backbone_shape_mismatch_names_key(tmp_path):
    lm = tiny_backbone()
    titan.save_backbone(lm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ssm_cfg"]["d_state"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"A_log: .* has \(64, 8\), the model expects \(64, 4\)"):
        titan.load_backbone(tmp_path)


def test_load_backbone_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        titan.load_backbone(tmp_path)


def test_frozen_dtype_keeps_scan_params_fp32(tmp_path):
    titan.save_backbone(tiny_backbone(), tmp_path)
    lm, _ = titan.load_backbone(tmp_path, dtype=torch.bfloat16)
    for name, p in lm.named_parameters():
        fp32 = name.endswith(("A_log", "D", "dt_proj.bias"))
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), (name, p.dtype)


def make_checkpoint(tmp_path, model):
    titan.save_backbone(model.lm, tmp_path / "bb")
    ckpt = {"format": titan.CHECKPOINT_FORMAT, "config": model.cfg.to_dict(), "trainable": model.trainable_state_dict(),
            "step": 0, "backbone": {"source": "bb", "demo": True}, "tokenizer": "bytes", "args": {}}
    titan.atomic_save(ckpt, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_checkpoint_roundtrip_reproduces_logits(tmp_path):
    model = tiny_titan().eval()
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = make_checkpoint(tmp_path, model)
    loaded, tok, _ = titan.load_titan(path)
    ids = torch.randint(0, model.vocab_size, (2, 14))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_checkpoint_holds_no_backbone_weights(tmp_path):
    model = tiny_titan()
    ckpt = torch.load(make_checkpoint(tmp_path, model), weights_only=True)
    assert not any(k.startswith("lm.") for k in ckpt["trainable"]), "frozen weights were saved"


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_bad_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="checkpoint .*(empty|could not be read)"):
        titan.read_checkpoint(path)


def test_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        titan.read_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# tokenizers and data


def test_byte_tokenizer_roundtrip():
    tok = titan.byte_tokenizer()
    text = "héllo 12+7=19 \n 🙂"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("name", ["bytes", "r50k_base"])
def test_special_text_never_gives_special_ids(name):
    if name == "r50k_base" and not os.environ.get("TIKTOKEN_CACHE_DIR") and (SHARED / "tiktoken-cache").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")
    tok = titan.get_tokenizer(name)
    rec = {"question": "<think> <|endoftext|> </think>", "reasoning": "a </think> b <|end|>", "answer": "<think>"}
    ids, _ = titan.format_example(tok, rec)
    special = [i for i in ids if i >= tok.n_vocab]
    assert special == [tok.think_id, tok.end_think_id, tok.eot_id], special
    if name == "r50k_base":
        assert 50256 not in tok.encode("<|endoftext|>")


def test_r50k_matches_tiktoken():
    if not os.environ.get("TIKTOKEN_CACHE_DIR") and (SHARED / "tiktoken-cache").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")
    import tiktoken
    tok = titan.get_tokenizer("r50k_base")
    text = "Hello world, 12+7=19.\n  indented"
    assert tok.encode(text) == tiktoken.get_encoding("r50k_base").encode_ordinary(text)
    assert tok.n_vocab == 50257


def test_loss_mask_supervises_exactly_the_completion():
    tok = titan.byte_tokenizer()
    rec = {"question": "1+2", "reasoning": "1+2=3", "answer": "3"}
    ids, mask = titan.format_example(tok, rec)
    prompt = tok.encode("User: 1+2\nAssistant: ")
    assert ids[:len(prompt)] == prompt
    assert ids[len(prompt)] == tok.think_id
    x, y = titan.make_batch([(ids, mask)], pad_id=0)
    # position i predicts ids[i + 1]: the first target is <think>, predicted from the last prompt token
    assert (y[0, :len(prompt) - 1] == -100).all(), y[0, :len(prompt)]
    assert y[0, len(prompt) - 1].item() == tok.think_id
    assert y[0, len(prompt) - 1:].tolist() == ids[len(prompt):], "some completion token is not supervised"
    assert x[0].tolist() == ids[:-1]


def test_make_batch_pads_with_ignored_targets():
    tok = titan.byte_tokenizer()
    a = titan.format_example(tok, {"question": "1", "reasoning": "", "answer": "1"})
    b = titan.format_example(tok, {"question": "12345", "reasoning": "long", "answer": "2"})
    x, y = titan.make_batch([a, b], pad_id=tok.eot_id)
    assert (y[0, len(a[0]) - 1:] == -100).all()


def test_format_example_truncates_to_seq_len():
    tok = titan.byte_tokenizer()
    rec = {"question": "q", "reasoning": "x" * 500, "answer": "a"}
    ids, mask = titan.format_example(tok, rec, seq_len=64)
    assert len(ids) == 65 and len(mask) == 65
    assert titan.format_example(tok, {"question": "q" * 100, "reasoning": "", "answer": "a"}, seq_len=64) is None


def test_read_jsonl_shapes(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>r1</think>A1"}]},
        {"prompt": "Q2", "response": "<think>\nr2\n</think>\nA2"},
        {"question": "Q3", "reasoning": "r3", "answer": "A3"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = titan.read_jsonl(path)
    assert records == [{"question": f"Q{i}", "reasoning": f"r{i}", "answer": f"A{i}"} for i in (1, 2, 3)]


def test_read_jsonl_skips_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "a"}\n{not json\n{"question": "q2", "answer": "a2"}\n'
                     b'{"question": "q3", "answer": "a3"}\n')
    messages = []
    records = titan.read_jsonl(path, log=messages.append)
    assert len(records) == 3
    assert "line 2" in messages[0], messages


@pytest.mark.parametrize("content,match", [(b"", "no valid record"), (b"[1]\n{}\n", "no valid record"),
                                           (b'{"q": 1}\n' * 3 + b'{"question": "a", "answer": "b"}\n', "invalid")])
def test_read_jsonl_errors(tmp_path, content, match):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        titan.read_jsonl(path, log=lambda _: None)


def test_arithmetic_problem_is_consistent():
    rng = random.Random(0)
    for _ in range(200):
        rec = titan.arithmetic_problem(rng, rng.choice([2, 3, 4]), 30)
        assert eval(rec["question"]) == int(rec["answer"]), rec
        lines = rec["reasoning"].split("\n")
        assert len(lines) == rec["n_steps"]
        for line in lines:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) < 30, line


def test_answer_extraction_and_grading():
    assert titan.extract_answer("<think>\n1+2=3\n</think>\n3<|end|>") == "3"
    assert titan.extract_answer("<think>\nno end") is None
    assert titan.grade("3", "3.0")
    assert not titan.grade("4", "3")
    assert not titan.grade(None, "3")


def test_find_loop():
    assert titan.find_loop([7, 5, 6, 5, 6, 5, 6, 5, 6], max_period=8, min_repeats=4) == (2, 1)
    assert titan.find_loop([56] * 6, min_repeats=4) == (1, 0)
    assert titan.find_loop([1, 2, 3, 4, 5, 6], min_repeats=2) is None


def test_generate_matches_full_forward_greedy():
    model = tiny_titan().eval()
    torch.nn.init.normal_(model.arms.up.weight, std=0.2)
    tok = titan.byte_tokenizer()
    prompts = [tok.encode("User: 1+2"), tok.encode("hi")]
    outs = titan.generate(model, tok, prompts, max_new_tokens=6)
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        for _ in range(len(out)):
            with torch.no_grad():
                logits, _, _ = model(torch.tensor([ids]))
            ids.append(logits[0, -1].argmax().item())
        assert ids[len(prompt):] == out


# ---------------------------------------------------------------------------------------------
# scripts


def run(args, cwd=ROOT, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("script", ["train.py", "sample.py", "inspect.py"])
def test_script_help_runs_from_root(script):
    result = run([script, "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_import_torch_from_root_gets_stdlib_inspect():
    result = run(["-c", "import torch, inspect; print(inspect.__file__); print(inspect.signature(len))"])
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(result.stdout.splitlines()[0]).parent != ROOT, result.stdout


def test_train_sample_inspect_smoke(tmp_path):
    out = tmp_path / "out"
    result = run(["train.py", "--out_dir", str(out), "--pretrain_steps", "30", "--demo_d_model", "16",
                  "--demo_n_layer", "2", "--max_steps", "4", "--batch_size", "4", "--eval_problems", "3",
                  "--log_interval", "2", "--eval_interval", "2", "--seq_len", "64", "--moe_scale", "1.5"])
    assert result.returncode == 0, result.stderr
    assert "step 4: loss" in result.stdout, result.stdout
    assert "held-out accuracy, backbone alone (moe_scale 0)" in result.stdout
    assert (out / "ckpt.pt").is_file() and (out / "demo_backbone" / "config.json").is_file()

    result = run(["sample.py", "--ckpt", str(out / "ckpt.pt"), "--prompt", "3+4-2", "--max_new_tokens", "12"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("User: 3+4-2\nAssistant: "), result.stdout

    report = tmp_path / "report.json"
    result = run(["inspect.py", str(out / "ckpt.pt"), "--n", "4", "--json", str(report)])
    assert result.returncode == 0, result.stderr
    for heading in ("Termination geometry", "PreNorm signal growth", "Router", "Blackboard"):
        assert heading in result.stdout, heading
    figures = json.loads(report.read_text())
    assert 0 <= figures["geometry"]["</think>"]["percentile"] <= 100


def test_train_rejects_bad_flags(tmp_path):
    for flags, message in ((["--top_k", "9"], "--top_k 9"), (["--moe_scale", "nan"], "--moe_scale nan"),
                           (["--seq_len", "0"], "--seq_len 0")):
        result = run(["train.py", "--out_dir", str(tmp_path), *flags])
        assert result.returncode == 2, (flags, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_sample_rejects_missing_checkpoint(tmp_path):
    result = run(["sample.py", "--ckpt", str(tmp_path / "none.pt")])
    assert result.returncode == 2
    assert "not found" in result.stderr and "Traceback" not in result.stderr, result.stderr


# GPT-NeoX-20B ids for (text, ids) pairs, recorded once with HF tokenizers 0.23.3 (a development
# tool, not a dependency) from a copy of the file. For texts that contain a special-token literal,
# the reference was the same file with its special entries removed from added_tokens, so that
# the literal is encoded as ordinary text, as Titan's contract requires.
NEOX_GOLDEN = [
    ('', []),
    ('Hello, world!', [12092, 13, 1533, 2]),
    ('class Stack:\n    """A list with push and pop."""\n\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        if item is None:\n            raise ValueError("item is None")\n        self.items.append(item)\n', [2437, 24544, 27, 187, 50274, 32488, 34, 1618, 342, 7450, 285, 1684, 46289, 535, 50274, 1545, 4772, 4478, 21920, 1286, 2262, 187, 50270, 1286, 15, 15565, 426, 8168, 535, 50274, 1545, 7450, 9, 1286, 13, 5382, 2262, 187, 50270, 338, 5382, 310, 8256, 27, 187, 50266, 22525, 11740, 4756, 1587, 4835, 310, 8256, 2807, 187, 50270, 1286, 15, 15565, 15, 9691, 9, 4835, 10, 187]),
    ('def f(x):\n\tif x:\n\t\treturn 1\n\treturn 0\n', [1545, 269, 9, 89, 2262, 187, 186, 338, 1269, 27, 996, 186, 2309, 337, 187, 186, 2309, 470, 187]),
    ('if a:\n  \tb = 1\n\t    c = 2\n', [338, 247, 27, 187, 50276, 186, 67, 426, 337, 996, 50274, 68, 426, 374, 187]),
    ('caf\xe9 na\xefve r\xe9sum\xe9', [68, 2320, 860, 36060, 9568, 2204, 860]),
    ('cafe\u0301 nai\u0308ve re\u0301sume\u0301', [68, 2320, 860, 36060, 9568, 2204, 860]),
    ('\u212bngstr\xf6m A\u030angstro\u0308m', [18221, 1251, 46816, 17732, 1251, 46816]),
    ('\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af', [26532, 212, 209, 39742, 36178, 211]),
    ('e\u1df8\u0323 \U000105d2\u0307 \U00011935\U00011930', [70, 157, 39068, 136, 98, 209, 172, 227, 234, 229, 136, 218, 209, 172, 228, 99, 115, 172, 228, 99, 110]),
    ('\U0001f600 \U0001f44d\U0001f3fd done', [14931, 235, 211, 22692, 228, 224, 14931, 226, 123, 2218]),
    ('family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 here', [11807, 22692, 228, 103, 325, 224, 14931, 228, 104, 325, 224, 14931, 228, 102, 325, 224, 14931, 228, 101, 1060]),
    ('flags \U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5\U0001f1e9\U0001f1ea', [12790, 22692, 218, 120, 14931, 218, 118, 14931, 218, 109, 14931, 218, 115, 14931, 218, 104, 14931, 218, 105]),
    ('\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002\u6211\u4eec\u53bb\u516c\u56ed\u5427\uff01', [37248, 40120, 40120, 17289, 231, 45091, 34439, 4340, 31486, 44781, 35601, 10041, 244, 7719, 102, 26680]),
    ('\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8', [49868, 19119, 241, 3917, 28656, 33548, 38206, 6088, 39742, 166, 115, 244, 39907, 25811, 216, 224, 33057, 99, 169, 221, 118]),
    ('0 7 42 1234567890 3.14159 -2.5e-10 1,000,000 99999999999999999999', [17, 818, 5976, 1249, 16767, 25025, 2270, 495, 15, 1047, 17220, 428, 19, 15, 22, 70, 14, 740, 337, 13, 933, 13, 933, 898, 43977, 43977, 16742]),
    ('a+b=c; x->y != z?! (e.g.) [1] {k: v} @#$%^&*~`|\\ ... --- \'\'\' """', [66, 12, 67, 30, 68, 28, 1269, 1168, 90, 3613, 1182, 22418, 313, 70, 15, 72, 2698, 544, 18, 62, 551, 76, 27, 362, 94, 1214, 4, 5, 6, 63, 7, 3853, 65, 3577, 3346, 8915, 42011, 12251]),
    ("it's I'm we're they've she'll he'd CAN'T it'S", [262, 434, 309, 1353, 359, 1472, 597, 1849, 703, 1833, 344, 1871, 20753, 8, 53, 352, 8, 52]),
    ('line one\nline two\r\nline three\r\n\r\n\n\n\nafter blank lines\n', [1282, 581, 187, 1282, 767, 190, 187, 1282, 1264, 4888, 2756, 187, 6438, 9912, 3104, 187]),
    ('trailing spaces   ', [7604, 4837, 8470, 50275]),
    ('   leading spaces', [50275, 16378, 8470]),
    (' \n \n  \n\t\n', [4928, 187, 50276, 22417]),
    ('end of text <|endoftext|> and more', [423, 273, 2505, 654, 93, 423, 1171, 1156, 49651, 285, 625]),
    ('<|endoftext|>', [29, 93, 423, 1171, 1156, 49651]),
    (' <|endoftext|><|endoftext|>', [654, 93, 423, 1171, 1156, 93, 2730, 93, 423, 1171, 1156, 49651]),
    ('<think>step one</think>answer', [29, 18959, 31, 10539, 581, 870, 18959, 31, 31984]),
    ('  <think>\n    reason\n  </think>\n', [50276, 29, 18959, 31, 187, 50274, 10752, 187, 50276, 870, 18959, 31, 187]),
    ('<|unk|> <|padding|>', [29, 93, 3938, 49651, 654, 93, 17333, 49651]),
    ('non-breaking\xa0space, ideographic\u3000space, next\x85line', [4160, 14, 22071, 575, 5641, 13, 1827, 5576, 19409, 5641, 13, 1735, 16643, 1282]),
    ('tab\tseparated\tvalues\t\t\tend', [8476, 186, 49741, 186, 8858, 623, 186, 423]),
    ('mixed \t \t  \t   tabs', [37340, 28910, 28910, 50276, 186, 50275, 33754]),
    ('\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac, \u0440\u0443\u0441\u0441\u043a\u0438\u0439, \u0627\u0644\u0639\u0631\u0628\u064a\u0629, \u05e2\u05d1\u05e8\u05d9\u05ea, \u0939\u093f\u0928\u094d\u0926\u0940', [138, 232, 29704, 4992, 3147, 12388, 8348, 13, 9160, 46640, 10453, 18664, 13, 9445, 13793, 6900, 13621, 32229, 13, 6810, 97, 27339, 21062, 13963, 105, 13, 28817, 20489, 23068, 17665, 46175, 22224]),
    ('a b', [66, 270]),
    ('a  b', [66, 50276, 67]),
    ('a   b', [66, 50275, 67]),
    ('a    b', [66, 50274, 67]),
    ('a     b', [66, 50273, 67]),
    ('a      b', [66, 50272, 67]),
    ('a       b', [66, 50271, 67]),
    ('a        b', [66, 50270, 67]),
    ('a         b', [66, 50269, 67]),
    ('a          b', [66, 50268, 67]),
    ('a           b', [66, 50267, 67]),
    ('a            b', [66, 50266, 67]),
    ('a             b', [66, 50265, 67]),
    ('a              b', [66, 50264, 67]),
    ('a               b', [66, 50263, 67]),
    ('a                b', [66, 50262, 67]),
    ('a                 b', [66, 50261, 67]),
    ('a                  b', [66, 50260, 67]),
    ('a                   b', [66, 50259, 67]),
    ('a                    b', [66, 50258, 67]),
    ('a                     b', [66, 50257, 67]),
    ('a                      b', [66, 50256, 67]),
    ('a                       b', [66, 50255, 67]),
    ('a                        b', [66, 50254, 67]),
    ('a                         b', [66, 50254, 270]),
    ('a                          b', [66, 50254, 50276, 67]),
    ('a                           b', [66, 50254, 50275, 67]),
    ('a                            b', [66, 50254, 50274, 67]),
    ('a                             b', [66, 50254, 50273, 67]),
    ('a                              b', [66, 50254, 50272, 67]),
    ('a                               b', [66, 50254, 50271, 67]),
    ('a                                b', [66, 50254, 50270, 67]),
    ('a                                 b', [66, 50254, 50269, 67]),
    ('a                                  b', [66, 50254, 50268, 67]),
    ('a                                   b', [66, 50254, 50267, 67]),
    ('a                                    b', [66, 50254, 50266, 67]),
    ('a                                     b', [66, 50254, 50265, 67]),
    ('a                                      b', [66, 50254, 50264, 67]),
    ('a                                       b', [66, 50254, 50263, 67]),
    ('a                                        b', [66, 50254, 50262, 67]),
    ('a                                         b', [66, 50254, 50261, 67]),
    ('a                                          b', [66, 50254, 50260, 67]),
    ('a                                           b', [66, 50254, 50259, 67]),
    ('a                                            b', [66, 50254, 50258, 67]),
    ('a                                             b', [66, 50254, 50257, 67]),
    ('a                                              b', [66, 50254, 50256, 67]),
    ('a                                               b', [66, 50254, 50255, 67]),
    ('a                                                b', [66, 50254, 50254, 67]),
    ('a                                                 b', [66, 50254, 50254, 270]),
    ('a                                                  b', [66, 50254, 50254, 50276, 67]),
    ('a                                                   b', [66, 50254, 50254, 50275, 67]),
    ('a                                                    b', [66, 50254, 50254, 50274, 67]),
    ('a                                                     b', [66, 50254, 50254, 50273, 67]),
    ('a                                                      b', [66, 50254, 50254, 50272, 67]),
    ('a                                                       b', [66, 50254, 50254, 50271, 67]),
    ('a                                                        b', [66, 50254, 50254, 50270, 67]),
    ('a                                                         b', [66, 50254, 50254, 50269, 67]),
    ('a                                                          b', [66, 50254, 50254, 50268, 67]),
    ('a                                                           b', [66, 50254, 50254, 50267, 67]),
    ('a                                                            b', [66, 50254, 50254, 50266, 67]),
    (' ', [209]),
    ('  ', [50276]),
    ('   ', [50275]),
    ('                       ', [50255]),
    ('                        ', [50254]),
    ('                         ', [50254, 209]),
    ('                          ', [50254, 50276]),
    ('                                               ', [50254, 50255]),
    ('                                                ', [50254, 50254]),
    ('                                                 ', [50254, 50254, 209]),
    ('                                                  ', [50254, 50254, 50276]),
    ('                                                            ', [50254, 50254, 50266]),
    ('x\n y', [89, 187, 340]),
    ('x\n  y', [89, 187, 50276, 90]),
    ('x\n    y', [89, 187, 50274, 90]),
    ('x\n        y', [89, 187, 50270, 90]),
    ('x\n            y', [89, 187, 50266, 90]),
    ('x\n                        y', [89, 187, 50254, 90]),
    ('x\n                         y', [89, 187, 50254, 340]),
    ('x\n                                 y', [89, 187, 50254, 50269, 90]),
    (' 1 !', [337, 2195]),
    ('  1  !', [50276, 18, 50276, 2]),
    ('                         1                         !', [50254, 337, 50254, 2195]),
]

# ---------------------------------------------------------------------------------------------
# GPT-NeoX-20B tokenizer through tiktoken

NEOX_JSON = SHARED / "gpt-neox-20b-tokenizer.json"
needs_neox = pytest.mark.skipif(not NEOX_JSON.is_file(), reason=f"{NEOX_JSON} not found")


@pytest.fixture(scope="module")
def neox():
    return titan.get_tokenizer(str(NEOX_JSON))


@needs_neox
def test_neox_sizes(neox):
    assert neox.n_vocab == 50277
    assert (neox.think_id, neox.end_think_id) == (50277, 50278), "<think> and </think> take the first free ids"


@needs_neox
@pytest.mark.parametrize("index", range(len(NEOX_GOLDEN)))
def test_neox_matches_golden_ids(neox, index):
    text, expected = NEOX_GOLDEN[index]
    got = neox.encode(text)
    assert got == expected, f"encode({text!r}) = {got}, reference {expected}"
    assert neox.decode(got) == titan.normalize_nfc_like_hf(text)


@needs_neox
def test_neox_golden_covers_the_traps():
    texts = [text for text, _ in NEOX_GOLDEN]
    for literal in ("<|endoftext|>", "</think>"):
        assert any(literal in t for t in texts), literal
    assert any("cafe\u0301" in t for t in texts) and any("caf\u00e9" in t for t in texts), "NFD and NFC accents"
    assert any(" " * 30 in t for t in texts), "long space runs"


@needs_neox
@pytest.mark.parametrize("text", ["<|endoftext|>", "a<|endoftext|>b", "<|unk|><|padding|>"])
def test_neox_special_literal_stays_text(neox, text):
    ids = neox.encode(text)
    assert not {0, 1} & set(ids), ids
    assert neox.decode(ids) == text
