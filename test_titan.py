"""Tests for Titan. Run from the project root: python -m pytest -q"""

import hashlib
import json
import math
import os
import pathlib
import random
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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
    assert dt.min() >= 1e-3 * 0.999, dt.min()
    assert dt.max() <= 0.1 * 1.001, dt.max()
    assert torch.equal(mixer.A_log[0], torch.log(torch.arange(1, 7.0))), mixer.A_log[0]
    assert torch.equal(mixer.D, torch.ones(80))


def test_backbone_init_keeps_dt_bias():
    lm = tiny_backbone()
    for layer in lm.layers:
        dt = F.softplus(layer.mixer.dt_proj.bias)
        assert dt.min() >= 1e-3 * 0.999, dt.min()
        assert dt.max() <= 0.1 * 1.001, dt.max()


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


def test_chunked_cross_entropy_matches_full():
    model = tiny_titan()
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    params = model.trainable_parameters()
    ids = torch.randint(0, model.vocab_size, (2, 11))
    targets = torch.randint(0, model.vocab_size, (2, 11))
    targets[0, :4] = -100
    logits, _, _ = model(ids)
    full = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    expected = torch.autograd.grad(full, params)
    model.ce_chunk = 3                  # 22 positions: 7 full chunks and a last one of 1
    chunked, _, _ = model(ids, targets=targets)
    got = torch.autograd.grad(chunked, params)
    assert torch.allclose(chunked, full, rtol=1e-5)
    for g_full, g_chunk in zip(expected, got):
        assert torch.allclose(g_full, g_chunk, rtol=1e-4, atol=1e-6)


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
    with pytest.raises(ValueError, match=r"A_log: checkpoint has \(64, 8\), model expects \(64, 4\); is d_state right"):
        titan.load_backbone(tmp_path)


def test_load_backbone_missing_file(tmp_path):
    with pytest.raises(titan.CheckpointError, match="config.json not found"):
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


def test_checkpoint_from_other_backbone_names_fields(tmp_path):
    path = make_checkpoint(tmp_path, tiny_titan())
    titan.save_backbone(tiny_backbone(d_state=4), tmp_path / "bb")
    with pytest.raises(ValueError, match=r"different backbone .*d_state \(checkpoint 8, backbone 4\)"):
        titan.load_titan(path)


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


def test_format_example_truncates_reasoning_not_answer():
    tok = titan.byte_tokenizer()
    rec = {"question": "q", "reasoning": "x" * 500, "answer": "42"}
    stats = {}
    ids, mask = titan.format_example(tok, rec, seq_len=64, stats=stats)
    assert len(ids) == 65, len(ids)
    assert len(mask) == 65, len(mask)
    assert ids[-5:] == [tok.end_think_id] + tok.encode("\n42") + [tok.eot_id], tok.decode(ids)
    full, _ = titan.format_example(tok, rec)
    assert stats["cut_tokens"] == len(full) - 65
    too_long = {"question": "q" * 100, "reasoning": "", "answer": "a"}
    assert titan.format_example(tok, too_long, seq_len=64) is None


@pytest.mark.parametrize("response,reasoning,answer", [
    ("<think>\nr\n</think>\n\nA", "r", "A"),             # DeepSeek-style
    ("r</think>A", "r", "A"),                              # opening tag in the chat template
    ("<think></think>A", "", "A"),                         # empty reasoning
    ("just A", "", "just A"),                              # no thinking at all
])
def test_split_thinking_shapes(response, reasoning, answer):
    assert titan.split_thinking("Q", response) == {"question": "Q", "reasoning": reasoning, "answer": answer}


def test_split_thinking_unclosed_is_invalid():
    assert titan.split_thinking("Q", "<think> cut off mid-thought") is None


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
    good = b'{"question": "q", "answer": "a"}\n'
    path.write_bytes(b"\xef\xbb\xbf" + good + b"{not json\n" + good + b"\n\n" + b'{"question": "\xff", "answer": "a"}\n'
                     + good + b'{"question": "q\x00", "answer": "a"}\n' + good + good)
    messages = []
    records = titan.read_jsonl(path, log=messages.append)
    assert len(records) == 5, "the BOM line and every valid line are kept"
    assert "skipped 3 of 8 lines" in messages[0], messages
    for lineno in ("line 2", "line 6", "line 8"):
        assert lineno in messages[0], (lineno, messages)


@pytest.mark.parametrize("line", [
    b'{"question": null, "answer": null}',
    b'{"question": 3, "answer": NaN}',
    b'{"question": "", "reasoning": "", "answer": ""}',
    b'{"messages": [{"role": "user"}, {"role": "assistant"}]}',
    b"[" * 100000 + b"]" * 100000,
])
def test_read_jsonl_skips_unusable_record(tmp_path, line):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "a"}\n' * 3 + line + b"\n")
    messages = []
    records = titan.read_jsonl(path, log=messages.append)
    assert len(records) == 3
    assert "skipped 1 of 4 lines: line 4" in messages[0], messages


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
    assert (out / "ckpt.pt").is_file()
    assert (out / "demo_backbone" / "config.json").is_file()

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
    cases = [(["--top_k", "9"], "--top_k 9"), (["--moe_scale", "nan"], "--moe_scale nan"),
             (["--seq_len", "0"], "--seq_len 0"), (["--eval_problems", "0"], "--eval_problems 0 must be at least 1"),
             (["--d_blackboard", "0"], "--d_blackboard 0 must be at least 1"),
             (["--lr", "-1"], "--lr -1.0 must be a finite number > 0"), (["--lr", "nan"], "--lr nan"),
             (["--weight_decay", "-0.5"], "--weight_decay -0.5 must be"), (["--warmup_steps", "-3"], "--warmup_steps -3"),
             (["--grad_clip", "-1"], "--grad_clip -1.0"), (["--stop_step", "2000"], "--stop_step 2000 is after"),
             (["--device", "foo"], "--device foo is not a device"), (["--out_dir", ""], "--out_dir is empty")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU; pass --device cpu"))
    for flags, message in cases:
        out = [] if "--out_dir" in flags else ["--out_dir", str(tmp_path)]
        result = run(["train.py", *out, *flags])
        assert result.returncode == 2, (flags, result.stderr)
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("flags, message", [(["--top_k", "-3"], "--top_k -3 must be >= 0"),
                                            (["--guard_repeats", "0"], "--guard_repeats 0 must be at least 2")])
def test_sample_rejects_bad_flags(tmp_path, flags, message):
    result = run(["sample.py", "--ckpt", str(tmp_path / "none.pt"), *flags])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr


def test_sample_rejects_missing_checkpoint(tmp_path):
    result = run(["sample.py", "--ckpt", str(tmp_path / "none.pt")])
    assert result.returncode == 2
    assert "not found" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


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


# ---------------------------------------------------------------------------------------------
# hub download, safetensors and both checkpoint layouts, against a loopback server on 127.0.0.1
#
# The checkpoints are tiny random Mamba-1 models (d_model 16, n_layer 2, vocab 50, d_state 4)
# written in both the state-spaces and the transformers layout.

REPO_BIN = "state-spaces/tiny"
REPO_SAFETENSORS = "state-spaces/tiny-hf"
REPO_SHARDED = "state-spaces/tiny-hf-sharded"
TOKENIZER = {"model": {"vocab": {f"t{i}": i for i in range(47)}},
             "added_tokens": [{"id": i} for i in (47, 48, 49)]}


# ---------------------------------------------------------------- fake hub


class FakeHub:
    """Loopback server for /<repo>/resolve/main/<file> with switchable faults.

    `requests` logs (path, Range header) of every GET. A path in `cuts` closes the connection
    after half the body, once per count. With `ignore_range` set, the server sends the whole file
    for a Range request.
    """

    def __init__(self):
        self.files, self.headers, self.redirects = {}, {}, {}
        self.requests, self.cuts, self.ignore_range = [], {}, False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHubHandler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, name: str, data: bytes, headers: dict | None = None) -> str:
        """Serve `data` as `name` in `repo`, with a real hub's ETag unless `headers` is given; return its path."""
        path = f"/{repo}/resolve/main/{name}"
        self.files[path] = data
        if headers is None:  # LFS files carry their sha256, small files a git sha1
            is_lfs = name.endswith((".bin", ".safetensors"))
            digest = hashlib.sha256(data) if is_lfs else hashlib.sha1(b"blob %d\0" % len(data) + data)
            headers = {"ETag": f'"{digest.hexdigest()}"'}
        self.headers[path] = headers
        return path

    def add_repo(self, repo: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            self.add(repo, name, data)

    def paths_requested(self) -> list[str]:
        return [path for path, _ in self.requests]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _FakeHubHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        fake = self.server.hub
        fake.requests.append((self.path, self.headers.get("Range")))
        if self.path in fake.redirects:
            location, headers = fake.redirects[self.path]
            self.send_response(302)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = fake.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return

        start = 0
        range_header = self.headers.get("Range")
        if range_header and not fake.ignore_range:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        for key, value in fake.headers.get(self.path, {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()

        body = data[start:]
        if fake.cuts.get(self.path, 0) > 0:
            fake.cuts[self.path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def offline_environment(tmp_path, monkeypatch):
    """Point the hub at a closed loopback port and the cache at a temporary folder, with no proxy."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HOME", raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def fake_hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- tiny checkpoints


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random backbone weights with state-spaces names and a tied lm_head (vocab 50 padded to 56)."""
    config = {"d_model": 16, "n_layer": 2, "vocab_size": 56, "d_state": 4, "d_conv": 4, "expand": 2, "dt_rank": 1}
    generator = torch.Generator().manual_seed(seed)
    shapes = titan.backbone_shapes(config)
    state_dict = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    state_dict["lm_head.weight"] = state_dict["backbone.embedding.weight"]
    return state_dict


STATE_SPACES_CONFIG = {"d_model": 16, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"d_state": 4}, "rms_norm": True,
                       "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
                       "tie_embeddings": True}
TRANSFORMERS_CONFIG = {"model_type": "mamba", "hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 56,
                       "state_size": 4, "conv_kernel": 4, "expand": 2, "time_step_rank": 1,
                       "layer_norm_epsilon": 1e-5, "intermediate_size": 32, "use_conv_bias": True,
                       "use_bias": False, "tie_word_embeddings": True}
SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], align: bool = True) -> bytes:
    """Serialize tensors in the safetensors format; align=False leaves the header unpadded."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header_bytes = json.dumps(header).encode()
    if align:
        header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks)


def torch_save_bytes(obj, tmp_path: Path, **kwargs) -> bytes:
    path = tmp_path / "saved.bin"
    torch.save(obj, path, **kwargs)
    data = path.read_bytes()
    path.unlink()
    return data


def transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename to the transformers layout, and leave out the tied lm_head as transformers does."""
    renamed = {name.replace("backbone.embedding.", "backbone.embeddings."): t for name, t in state_dict.items()}
    renamed.pop("lm_head.weight")
    return renamed


def repo_files(layout: str, tmp_path: Path, state_dict: dict | None = None) -> dict[str, bytes]:
    """Return the files of a tiny repo in `layout`: "bin", "safetensors" or "sharded"."""
    state_dict = state_dict or tiny_state_dict()
    if layout == "bin":
        return {"config.json": json.dumps(STATE_SPACES_CONFIG).encode(),
                "pytorch_model.bin": torch_save_bytes(state_dict, tmp_path),
                "tokenizer.json": json.dumps(TOKENIZER).encode()}
    renamed = transformers_state_dict(state_dict)
    files = {"config.json": json.dumps(TRANSFORMERS_CONFIG).encode()}
    if layout == "safetensors":
        files["model.safetensors"] = safetensors_bytes(renamed)
        return files
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        files[shard] = safetensors_bytes({name: renamed[name] for name in shard_names})
        weight_map.update({name: shard for name in shard_names})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- download_file


def test_download_file_shows_progress(fake_hub, tmp_path, capsys):
    data = os.urandom(300_000)
    path = fake_hub.add("o/r", "model.safetensors", data)
    dest = titan.download_file(fake_hub.url + path, tmp_path / "model.safetensors")
    stderr = capsys.readouterr().err
    assert dest.read_bytes() == data, "downloaded bytes differ from the served file"
    assert "model.safetensors: 0.3/0.3 MB" in stderr, f"progress line missing sizes: {stderr!r}"
    assert "MB/s" in stderr, f"progress line missing the rate: {stderr!r}"
    assert not (tmp_path / "model.safetensors.incomplete").exists(), "the .incomplete file was left behind"


def test_download_resumes_after_drop(fake_hub, tmp_path):
    data = os.urandom(200_001)
    path = fake_hub.add("o/r", "pytorch_model.bin", data)
    fake_hub.cuts[path] = 1
    dest = titan.download_file(fake_hub.url + path, tmp_path / "w.bin", progress=False, retry_delay_s=0)
    ranges = [header for _, header in fake_hub.requests]
    assert ranges[0] is None, f"the first request should not ask for a range: {ranges}"
    assert ranges[1] == f"bytes={len(data) // 2}-", f"the retry should resume at the half-way byte: {ranges}"
    assert dest.read_bytes() == data, "the resumed file is not byte-identical to the served one"


def test_download_keeps_partial_for_next_run(fake_hub, tmp_path):
    data = os.urandom(100_000)
    path = fake_hub.add("o/r", "pytorch_model.bin", data)
    fake_hub.cuts[path] = 1
    dest = tmp_path / "w.bin"
    with pytest.raises(titan.DownloadError, match="next run resumes"):
        titan.download_file(fake_hub.url + path, dest, progress=False, retries=0)
    partial = tmp_path / "w.bin.incomplete"
    assert partial.stat().st_size == len(data) // 2, "the partial file should hold the bytes received"
    assert not dest.exists(), "a partial download must not appear at the final path"

    titan.download_file(fake_hub.url + path, dest, progress=False, retries=0)
    assert fake_hub.requests[-1][1] == f"bytes={len(data) // 2}-", "the second run should resume with Range"
    assert dest.read_bytes() == data, "the resumed file is not byte-identical to the served one"


def test_download_restarts_if_range_ignored(fake_hub, tmp_path):
    data = os.urandom(50_000)
    path = fake_hub.add("o/r", "pytorch_model.bin", data)
    fake_hub.ignore_range = True
    (tmp_path / "w.bin.incomplete").write_bytes(b"\0" * 20_000)  # stale bytes that must be overwritten
    dest = titan.download_file(fake_hub.url + path, tmp_path / "w.bin", progress=False)
    assert fake_hub.requests[0][1] == "bytes=20000-", "the download should have tried to resume"
    assert dest.read_bytes() == data, "a 200 answer to a Range request must replace the partial file"


def test_download_handles_416(fake_hub, tmp_path):
    data = os.urandom(10_000)
    path = fake_hub.add("o/r", "pytorch_model.bin", data)
    (tmp_path / "done.bin.incomplete").write_bytes(data)  # complete, but never renamed
    done = titan.download_file(fake_hub.url + path, tmp_path / "done.bin", progress=False)
    assert done.read_bytes() == data, "a complete partial file should be verified and kept after 416"
    assert len(fake_hub.requests) == 1, "a complete partial file should need no second request"

    (tmp_path / "long.bin.incomplete").write_bytes(data + b"junk")
    long = titan.download_file(fake_hub.url + path, tmp_path / "long.bin", progress=False)
    assert long.read_bytes() == data, "a partial file longer than the file should be downloaded afresh"


@pytest.mark.parametrize("headers", [
    {"ETag": f'"{"0" * 64}"'},
    {"ETag": f'W/"{"0" * 64}"'},
    {"X-Linked-Etag": "0" * 64, "ETag": '"not-a-hash"'},
    {"X-Linked-Size": "10007"},
], ids=["etag", "weak-etag", "x-linked-etag", "x-linked-size"])
def test_download_rejects_corrupt_file(fake_hub, tmp_path, headers):
    path = fake_hub.add("o/r", "pytorch_model.bin", os.urandom(10_000), headers)
    dest = tmp_path / "w.bin"
    with pytest.raises(titan.DownloadError, match="sha256|announced 10007") as raised:
        titan.download_file(fake_hub.url + path, dest, progress=False)
    assert fake_hub.url + path in str(raised.value), f"the error should name the URL: {raised.value}"
    assert not dest.exists(), "a corrupt file must not appear at the final path"
    assert not (tmp_path / "w.bin.incomplete").exists(), "a corrupt partial file must be deleted"


def test_download_ignores_git_sha1_etag(fake_hub, tmp_path):
    data = b'{"d_model": 16}'
    path = fake_hub.add("o/r", "config.json", data, {"ETag": f'"{"a" * 40}"'})
    dest = titan.download_file(fake_hub.url + path, tmp_path / "config.json", progress=False)
    assert dest.read_bytes() == data, "a 40-hex git sha1 ETag must not be checked as a sha256"


def test_download_reads_hub_headers_on_redirect(fake_hub, tmp_path):
    storage = FakeHub()  # a second port, so a second host as far as the URL goes
    try:
        data = os.urandom(30_000)
        storage.add("cdn", "blob", data, {"ETag": f'"{"f" * 64}"'})  # storage's own ETag is not a sha256
        good = fake_hub.add("o/r", "good.bin", b"")
        bad = fake_hub.add("o/r", "bad.bin", b"")
        unlinked = fake_hub.add("o/r", "unlinked.bin", b"")
        blob_url = storage.url + "/cdn/resolve/main/blob"
        fake_hub.redirects[good] = (blob_url, {"X-Linked-Etag": f'"{sha256_hex(data)}"',
                                               "X-Linked-Size": str(len(data))})
        fake_hub.redirects[bad] = (blob_url, {"X-Linked-Etag": f'"{"1" * 64}"', "X-Linked-Size": str(len(data))})
        fake_hub.redirects[unlinked] = (blob_url, {})

        dest = titan.download_file(fake_hub.url + good, tmp_path / "good.bin", progress=False)
        assert dest.read_bytes() == data, "X-Linked-Etag should be checked in place of the storage host's ETag"
        dest = titan.download_file(fake_hub.url + unlinked, tmp_path / "unlinked.bin", progress=False)
        assert dest.read_bytes() == data, "the storage host's ETag must not be checked as the sha256"
        with pytest.raises(titan.DownloadError, match="sha256"):
            titan.download_file(fake_hub.url + bad, tmp_path / "bad.bin", progress=False)
        assert not (tmp_path / "bad.bin").exists(), "X-Linked-Etag on the redirect must be checked"
    finally:
        storage.stop()


def test_download_http_error_names_status(fake_hub, tmp_path):
    url = fake_hub.url + "/o/r/resolve/main/missing.bin"
    with pytest.raises(titan.DownloadError) as raised:
        titan.download_file(url, tmp_path / "missing.bin", progress=False)
    assert raised.value.status == 404, "the error should carry the HTTP status"
    assert "HTTP 404" in str(raised.value), f"the message should give the status: {raised.value}"
    assert url in str(raised.value), f"the message should give the URL: {raised.value}"


# ---------------------------------------------------------------- resolve_backbone


def test_resolve_downloads_then_works_offline(fake_hub, tmp_path, capsys):
    fake_hub.add_repo(REPO_BIN, repo_files("bin", tmp_path))
    folder = titan.resolve_backbone(REPO_BIN)
    assert folder == tmp_path / "cache" / "state-spaces--tiny", f"unexpected cache folder {folder}"
    assert "pytorch_model.bin:" in capsys.readouterr().err, "the weights download should print progress"
    assert not any(p.endswith("model.safetensors") for p in fake_hub.paths_requested()), \
        "safetensors should not be tried when pytorch_model.bin exists"

    fake_hub.stop()
    fake_hub.stop = lambda: None  # the fixture would stop it again
    assert titan.resolve_backbone(REPO_BIN, progress=False) == folder, "the cached folder should be used offline"
    config, state_dict, tokenizer = titan.read_backbone_files(folder)
    assert config["d_state"] == 4, f"config read from the cache is wrong: {config}"
    assert tokenizer == folder / "tokenizer.json", "the cached tokenizer should be found"


def test_resolve_falls_back_to_safetensors(fake_hub, tmp_path):
    fake_hub.add_repo(REPO_SAFETENSORS, repo_files("safetensors", tmp_path))
    folder = titan.resolve_backbone(REPO_SAFETENSORS, progress=False)
    requested = [p.rsplit("/", 1)[1] for p in fake_hub.paths_requested()]
    assert requested == ["config.json", "tokenizer.json", "pytorch_model.bin", "model.safetensors"], \
        f"unexpected request order: {requested}"
    assert (folder / "model.safetensors").is_file(), "model.safetensors should be cached"
    assert not (folder / "tokenizer.json").exists(), "a 404 for the optional tokenizer should be skipped"

    fake_hub.stop()
    fake_hub.stop = lambda: None  # the fixture would stop it again
    assert titan.resolve_backbone(REPO_SAFETENSORS) == folder, "a cache without the optional tokenizer should do"


def test_resolve_falls_back_to_sharded(fake_hub, tmp_path):
    files = repo_files("sharded", tmp_path)
    fake_hub.add_repo(REPO_SHARDED, files)
    folder = titan.resolve_backbone(REPO_SHARDED, progress=False)
    requested = {p.rsplit("/", 1)[1] for p in fake_hub.paths_requested()}
    assert {"pytorch_model.bin", "model.safetensors"} <= requested, "both single-file names should be tried first"
    for name in files:
        assert (folder / name).is_file(), f"{name} should be cached"


def test_resolve_without_weights_fails(fake_hub):
    fake_hub.add("o/empty", "config.json", b"{}")
    with pytest.raises(titan.DownloadError, match="none of the weight files"):
        titan.resolve_backbone("o/empty", progress=False)


def test_resolve_unknown_repo_fails(fake_hub):
    with pytest.raises(titan.DownloadError) as raised:
        titan.resolve_backbone("o/missing", progress=False)
    message = str(raised.value)
    assert "config.json not found in cache" in message, message
    assert "HTTP 404" in message, message
    assert "check the repo id or pass a local folder" in message, message


def test_resolve_offline_without_cache_fails():
    with pytest.raises(titan.DownloadError) as raised:
        titan.resolve_backbone("state-spaces/mamba-1.4b", progress=False)
    message = str(raised.value)
    assert message.startswith("--backbone state-spaces/mamba-1.4b: config.json not found in cache"), message
    assert "check the network or pass a local folder" in message, message


def test_resolve_rejects_corrupt_download(fake_hub, tmp_path):
    files = repo_files("bin", tmp_path)
    fake_hub.add_repo(REPO_BIN, files)
    fake_hub.headers[f"/{REPO_BIN}/resolve/main/pytorch_model.bin"] = {"X-Linked-Etag": "0" * 64}
    with pytest.raises(titan.DownloadError, match="sha256"):
        titan.resolve_backbone(REPO_BIN, progress=False)
    folder = tmp_path / "cache" / "state-spaces--tiny"
    assert not (folder / "pytorch_model.bin").exists(), "the corrupt weights must not be cached"
    with pytest.raises(titan.CheckpointError, match="no weights found"):
        titan.read_backbone_files(folder)


def test_resolve_local_paths(tmp_path):
    folder = write_folder(tmp_path / "local", {"config.json": b"{}", "model.safetensors": b""})
    assert titan.resolve_backbone(str(folder)) == folder, "a folder should be returned as is"
    assert titan.resolve_backbone(str(folder / "model.safetensors")) == folder, "a file should give its folder"
    for spec in ("./missing", str(tmp_path / "missing"), "checkpoints/pytorch_model.bin", "~/missing"):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            titan.resolve_backbone(spec)


def test_cache_dir_environment(tmp_path, monkeypatch):
    assert titan.hub_cache_dir() == tmp_path / "cache", "HF_HUB_CACHE should win"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert titan.hub_cache_dir() == tmp_path / "home" / "hub", "HF_HOME/hub should come next"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert titan.hub_cache_dir() == tmp_path / ".cache" / "titan" / "hub", "the project default should come last"


# ---------------------------------------------------------------- read_backbone_files


@pytest.mark.parametrize("layout", ["safetensors", "sharded"])
def test_layouts_normalise_identically(tmp_path, layout):
    state_spaces_folder = write_folder(tmp_path / "ss", repo_files("bin", tmp_path))
    expected_config, expected_state, _ = titan.read_backbone_files(state_spaces_folder)
    config, state_dict, _ = titan.read_backbone_files(write_folder(tmp_path / "hf", repo_files(layout, tmp_path)))
    assert expected_config == {"d_model": 16, "n_layer": 2, "vocab_size": 56, "pad_vocab_size_multiple": 8,
                               "d_state": 4, "d_conv": 4, "expand": 2, "dt_rank": 1, "norm_eps": 1e-5}, \
        f"unexpected canonical config {expected_config}"
    assert config == expected_config, f"{layout} config {config} differs from {expected_config}"
    assert sorted(state_dict) == sorted(expected_state), "the two layouts give different keys"
    for name, tensor in expected_state.items():
        assert torch.equal(state_dict[name], tensor), f"{name} differs between layouts"
    assert "lm_head.weight" not in state_dict, "the tied lm_head should be dropped"


def test_unpadded_vocab_kept(tmp_path):
    state_dict = tiny_state_dict()
    state_dict["backbone.embedding.weight"] = state_dict["lm_head.weight"] = torch.randn(50, 16)
    files = repo_files("safetensors", tmp_path, state_dict)
    files["config.json"] = json.dumps({**TRANSFORMERS_CONFIG, "vocab_size": 50}).encode()
    config, _, _ = titan.read_backbone_files(write_folder(tmp_path / "unpadded", files))
    assert config["vocab_size"] == 50, f"vocab_size should be the stored row count: {config}"
    assert config["pad_vocab_size_multiple"] == 1, f"padding 50 rows to 56 would not fit the weights: {config}"


def test_embedding_rows_must_fit_vocab(tmp_path):
    files = repo_files("bin", tmp_path)
    files["config.json"] = json.dumps({**STATE_SPACES_CONFIG, "vocab_size": 60}).encode()
    with pytest.raises(titan.CheckpointError, match="embedding has 56 rows"):
        titan.read_backbone_files(write_folder(tmp_path / "rows", files))


def test_untied_head_rejected(tmp_path):
    state_dict = tiny_state_dict()
    state_dict["lm_head.weight"] = state_dict["lm_head.weight"] + 1
    folder = write_folder(tmp_path / "untied", repo_files("bin", tmp_path, state_dict))
    with pytest.raises(titan.CheckpointError, match="lm_head.weight differs"):
        titan.read_backbone_files(folder)


def test_legacy_bin_format_loads(tmp_path):
    files = repo_files("bin", tmp_path)
    legacy = torch_save_bytes(tiny_state_dict(), tmp_path, _use_new_zipfile_serialization=False)
    files["pytorch_model.bin"] = legacy
    _, state_dict, _ = titan.read_backbone_files(write_folder(tmp_path / "legacy", files))
    assert torch.equal(state_dict["backbone.norm_f.weight"], tiny_state_dict()["backbone.norm_f.weight"]), \
        "the legacy torch.save format should load without mmap"


def test_pickle_payload_rejected(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    files = repo_files("bin", tmp_path)
    files["pytorch_model.bin"] = torch_save_bytes({"backbone.norm_f.weight": Payload()}, tmp_path)
    folder = write_folder(tmp_path / "evil", files)
    with pytest.raises(titan.CheckpointError, match="weights_only"):
        titan.read_backbone_files(folder)
    assert not marker.exists(), "the pickle payload ran during loading"

    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists(), "the payload should run without weights_only, or this test proves nothing"


def test_config_mismatch_names_tensor(tmp_path):
    files = repo_files("bin", tmp_path)
    files["config.json"] = json.dumps({**STATE_SPACES_CONFIG, "ssm_cfg": {"d_state": 8}}).encode()
    with pytest.raises(titan.CheckpointError, match=r"A_log: checkpoint has \(32, 4\), model expects \(32, 8\)"):
        titan.read_backbone_files(write_folder(tmp_path / "wrong", files))


@pytest.mark.parametrize("config, message", [
    ({**STATE_SPACES_CONFIG, "ssm_cfg": {"layer": "Mamba2"}}, "ssm_cfg layer is Mamba2"),
    ({**STATE_SPACES_CONFIG, "tie_embeddings": False}, "unties the output head"),
    ({**TRANSFORMERS_CONFIG, "model_type": "mamba2"}, "model_type is mamba2"),
    ({"n_layer": 2}, "neither d_model"),
    ({"d_model": 16}, "missing 'n_layer'"),
], ids=["mamba2", "untied", "hf-mamba2", "unknown", "missing-key"])
def test_unsupported_config_rejected(tmp_path, config, message):
    files = repo_files("bin", tmp_path)
    files["config.json"] = json.dumps(config).encode()
    with pytest.raises(titan.CheckpointError, match=message):
        titan.read_backbone_files(write_folder(tmp_path / "bad", files))


def test_tokenizer_vocab_size(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(TOKENIZER))
    assert titan.tokenizer_vocab_size(path) == 50, "47 vocabulary ids plus 3 added tokens should give 50"


# ---------------------------------------------------------------- check_state_dict


def test_check_state_dict_lists_every_problem():
    expected = {"a": (2, 3), "backbone.layers.0.mixer.A_log": (3072, 8), "gone": (1,)}
    got = {"a": torch.zeros(2, 3), "backbone.layers.0.mixer.A_log": torch.zeros(3072, 16),
           "extra": torch.zeros(1)}
    with pytest.raises(titan.CheckpointError) as raised:
        titan.check_state_dict(expected, got, "ckpt.bin")
    message = str(raised.value)
    expected_line = "backbone.layers.0.mixer.A_log: checkpoint has (3072, 16), model expects (3072, 8)"
    assert expected_line + "; is d_state right?" in message, message
    assert "1 missing keys:\n    gone" in message, message
    assert "1 unexpected keys:\n    extra" in message, message
    assert message.startswith("ckpt.bin does not fit the model"), message


def test_check_state_dict_accepts_match():
    shapes = {"a": (2, 3)}
    assert titan.check_state_dict(shapes, {"a": torch.zeros(2, 3)}, "ckpt") is None, "a matching dict should pass"


# ---------------------------------------------------------------- read_safetensors


@pytest.mark.parametrize("align", [True, False], ids=["aligned", "unaligned"])
def test_safetensors_round_trip(tmp_path, align):
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 3, 4, generator=generator).bfloat16(),
        "i64": torch.tensor([-(2**40), 0, 2**62]),
        "f64": torch.tensor(math.pi, dtype=torch.float64),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    path.write_bytes(safetensors_bytes(tensors, align=align))
    loaded = titan.read_safetensors(path)
    assert sorted(loaded) == sorted(tensors), "tensor names differ"
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype, f"{name}: dtype {loaded[name].dtype} != {tensor.dtype}"
        assert loaded[name].shape == tensor.shape, f"{name}: shape {loaded[name].shape} != {tensor.shape}"
        assert torch.equal(loaded[name], tensor), f"{name}: values differ"


def test_safetensors_is_memory_mapped(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(safetensors_bytes({"a": torch.ones(1000), "b": torch.zeros(1000)}))
    loaded = titan.read_safetensors(path)
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr(), \
        "tensors should be views of one mapping, not copies"
    assert loaded["a"].untyped_storage().nbytes() == path.stat().st_size, "the mapping should cover the file"


def corrupt_header(header: dict) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + b"\0" * 16


@pytest.mark.parametrize("data, message", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
    (struct.pack("<Q", 4) + b"{no}", "invalid JSON"),
    (corrupt_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}), "'w': data_offsets"),
    (corrupt_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}), "'w': 16 bytes"),
    (corrupt_header({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}), "'w' has an invalid entry"),
    (corrupt_header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "'w' has an invalid shape"),
], ids=["short", "header-length", "json", "offsets", "size", "dtype", "shape"])
def test_safetensors_corrupt_header(tmp_path, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(titan.CheckpointError, match=message):
        titan.read_safetensors(path)


def test_sharded_index_rejects_path_in_shard_name(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(titan.CheckpointError, match="not a plain file name"):
        titan.read_safetensors_sharded(index)


@pytest.mark.parametrize("layout", ["bin", "safetensors", "sharded"])
def test_layouts_give_identical_logits(tmp_path, layout):
    reference, _ = titan.load_backbone(write_folder(tmp_path / "ss", repo_files("bin", tmp_path)), vocab_size=50)
    model, _ = titan.load_backbone(write_folder(tmp_path / layout, repo_files(layout, tmp_path)), vocab_size=50)
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], reference(ids)[0])


def test_load_backbone_from_loopback_hub(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    fake_hub.add_repo(REPO_BIN, repo_files("bin", tmp_path))
    model, folder = titan.load_backbone(REPO_BIN, vocab_size=50, dtype=torch.bfloat16, progress=False)
    assert folder == tmp_path / "cache" / "state-spaces--tiny"
    assert model.embedding.weight.dtype == torch.bfloat16
    assert model.layers[0].mixer.A_log.dtype == torch.float32


def test_wrong_tokenizer_size_is_an_error(tmp_path):
    folder = write_folder(tmp_path / "ss", repo_files("bin", tmp_path))
    with pytest.raises(titan.CheckpointError, match="pass the tokenizer the backbone was trained with"):
        titan.load_backbone(folder, vocab_size=40)
    model, _ = titan.load_backbone(folder, vocab_size=40, force_vocab=True)
    assert model.cfg.vocab_size == 40, model.cfg.vocab_size
    assert model.cfg.padded_vocab_size == 56, model.cfg.padded_vocab_size


def test_dry_run_plans_without_download(tmp_path):
    result = run(["train.py", "--dry_run", "--backbone", "state-spaces/mamba-1.4b", "--seq_len", "2048",
                  "--batch_size", "1", "--dtype", "bfloat16", "--vram_gb", "4", "--out_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    for part in ("frozen weights", "trainable weights", "optimizer state", "activations", "total"):
        assert part in result.stdout, part
    assert "exceeds the 4.0 GiB budget" in result.stdout, result.stdout


def test_memory_plan_frozen_weights_exact():
    cfg = titan.TitanConfig(backbone=titan.MambaConfig(d_model=2048, n_layer=48, vocab_size=50277))
    plan = titan.sft_memory_plan(cfg, 1, 2048, torch.bfloat16)
    lm = titan.MambaLM(titan.MambaConfig(d_model=64, n_layer=2, vocab_size=50277))
    assert 2.5 * 2**30 < plan["frozen weights"] < 2.7 * 2**30, plan
    small = titan.sft_memory_plan(titan.TitanConfig(backbone=lm.cfg, d_bridge=16), 1, 8, torch.bfloat16)
    fp32 = ("A_log", "D", "dt_proj.bias")
    expected = sum(p.numel() * (4 if name.endswith(fp32) else 2) for name, p in lm.named_parameters())
    assert small["frozen weights"] == expected, (small, expected)


# ---------------------------------------------------------------------------------------------
# inspect.py metrics on constructed cases


@pytest.fixture(scope="module")
def inspect_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("titan_inspect", ROOT / "inspect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_norm_percentile_of_smallest_row(inspect_module):
    weight = torch.randn(100, 8) + 1.0
    weight[42] = weight.norm(dim=-1).min() * 0.5 * weight[42] / weight[42].norm()
    stats = inspect_module.row_norm_stats(weight, 42)
    assert stats["percentile"] == 0.0, stats
    assert stats["rank"] == 0, stats
    weight[42] *= 1000
    assert inspect_module.row_norm_stats(weight, 42)["percentile"] == pytest.approx(99.0)


def test_zero_up_projection_survives_nothing(inspect_module):
    model = tiny_titan().eval()
    ids = torch.randint(0, 256, (2, 12))
    with_arms, without = {}, {}
    with torch.no_grad():
        logits, _, _ = model(ids, probe=with_arms, moe_scale=3.0)
        logits_off, _, _ = model(ids, probe=without, moe_scale=0.0)
    share, kl = inspect_module.surviving_signal(with_arms["final_hidden"], without["final_hidden"], logits, logits_off)
    assert share == 0.0, share
    assert kl == 0.0, kl
    torch.nn.init.normal_(model.arms.up.weight, std=0.5)
    with torch.no_grad():
        logits, _, _ = model(ids, probe=with_arms, moe_scale=3.0)
    share, kl = inspect_module.surviving_signal(with_arms["final_hidden"], without["final_hidden"], logits, logits_off)
    assert share > 0, share
    assert kl > 0, kl


def test_routing_entropy_limits(inspect_module):
    assert inspect_module.routing_entropy(torch.full((5, 8), 1 / 8)) == pytest.approx(math.log(8))
    assert inspect_module.routing_entropy(F.one_hot(torch.zeros(5, dtype=torch.long), 8).float()) == pytest.approx(0.0)


def test_lock_needs_loop_and_high_cosine(inspect_module):
    ids = [7, 5, 6, 5, 6, 5, 6, 5, 6, 5, 6]
    assert inspect_module.lock_start(ids, [0.0] + [0.99] * 10, 0.95) == 1
    assert inspect_module.lock_start(ids, [0.0] + [0.5] * 10, 0.95) is None, "tokens loop but the state moves"
    assert inspect_module.lock_start([1, 2, 3, 4, 5, 6, 7, 8], [0.0] + [0.99] * 7, 0.95) is None
    # the state settles two steps into the loop: the lock begins there
    assert inspect_module.lock_start([56] * 10, [0.0, 0.94, 0.94] + [0.999] * 7, 0.95) == 3
    # it settles too late for min_repeats periods to follow
    assert inspect_module.lock_start([56] * 10, [0.0] + [0.5] * 6 + [0.999] * 3, 0.95) is None


def test_think_steps_counts_lines(inspect_module):
    assert inspect_module.think_steps("<think>\n1+2=3\n3+4=7\n</think>\n7") == 2
    assert inspect_module.think_steps("<think>\n1+2=3") is None


def test_cosine_matrix_diagonal(inspect_module):
    sims = inspect_module.cosine_matrix(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]))
    assert torch.allclose(sims, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))


# ---------------------------------------------------------------------------------------------
# interrupted and diverging runs

TINY_RUN = ["--pretrain_steps", "20", "--demo_d_model", "16", "--demo_n_layer", "2", "--batch_size", "4",
            "--eval_problems", "2", "--log_interval", "1", "--seq_len", "64"]


def test_nan_step_is_skipped(tmp_path):
    result = run(["train.py", "--out_dir", str(tmp_path), *TINY_RUN, "--max_steps", "3", "--eval_interval", "10",
                  "--inject_nan_step", "2", "--max_bad_steps", "2"])
    assert result.returncode == 2, result.stderr
    assert "step 2: non-finite loss nan; step skipped (1 in a row)" in result.stderr, result.stderr
    assert "2 non-finite steps in a row, the last at step 2; stopped" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    result = run(["train.py", "--out_dir", str(tmp_path), *TINY_RUN, "--max_steps", "6", "--eval_interval", "2",
                  "--inject_nan_step", "4", "--max_bad_steps", "3"])
    assert result.returncode == 2, result.stderr
    ckpt = titan.read_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 2, ckpt["step"]
    assert all(torch.isfinite(v).all() for v in ckpt["trainable"].values())


def test_sigterm_saves_and_exits(tmp_path):
    import signal
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", "--out_dir", str(tmp_path), *TINY_RUN, "--max_steps", "100000",
                             "--eval_interval", "100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 2:"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in out, out
    assert "continue with --resume" in out, out
    ckpt = titan.read_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] >= 2, ckpt["step"]


@pytest.fixture
def tiny_run(tmp_path):
    """A saved 2-layer backbone and a 30-record JSONL file, for train.py runs that skip pretraining."""
    torch.manual_seed(0)
    titan.save_backbone(titan.MambaLM(titan.MambaConfig(d_model=16, n_layer=2, d_state=4, vocab_size=256)),
                        tmp_path / "backbone")
    rng = random.Random(0)
    with open(tmp_path / "data.jsonl", "w") as f:
        for _ in range(30):
            f.write(json.dumps(titan.arithmetic_problem(rng, rng.choice([2, 3]), 30)) + "\n")
    return ["--backbone", str(tmp_path / "backbone"), "--tokenizer", "bytes", "--data", str(tmp_path / "data.jsonl"),
            "--d_bridge", "16", "--arm_d_state", "4", "--d_blackboard", "8", "--batch_size", "4", "--seq_len", "64",
            "--eval_problems", "2", "--log_interval", "1", "--warmup_steps", "2"]


def logged_losses(out_dir):
    """{step: loss} from log.jsonl; a step logged twice (after a resume) keeps its last value."""
    losses = {}
    for line in (out_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def test_resume_is_bit_identical(tmp_path, tiny_run):
    # 12 steps over 26 records at batch 4 cross two epochs, so the shuffled order must resume too
    whole, split = tmp_path / "whole", tmp_path / "split"
    result = run(["train.py", *tiny_run, "--out_dir", str(whole), "--max_steps", "12", "--eval_interval", "100"])
    assert result.returncode == 0, result.stderr
    result = run(["train.py", *tiny_run, "--out_dir", str(split), "--max_steps", "12", "--eval_interval", "100",
                  "--stop_step", "6"])
    assert result.returncode == 0, result.stderr
    assert "--stop_step: saved" in result.stdout, result.stdout
    assert max(logged_losses(split)) == 6
    result = run(["train.py", *tiny_run, "--out_dir", str(split), "--max_steps", "12", "--eval_interval", "100",
                  "--resume"])
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout, result.stdout
    assert "at step 6" in result.stdout, result.stdout
    assert logged_losses(split) == logged_losses(whole)
    a, b = titan.read_checkpoint(whole / "ckpt.pt"), titan.read_checkpoint(split / "ckpt.pt")
    assert a["step"] == b["step"] == 12
    for name, tensor in a["trainable"].items():
        assert torch.equal(tensor, b["trainable"][name]), name


def test_stop_step_before_resumed_step(tmp_path, tiny_run):
    out = tmp_path / "out"
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "4", "--stop_step", "2"])
    assert result.returncode == 0, result.stderr
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "4", "--stop_step", "2", "--resume"])
    assert result.returncode == 2, result.stderr
    assert "--stop_step 2 is not after the resumed step 2" in result.stderr, result.stderr


def test_fresh_run_refuses_checkpoint(tmp_path, tiny_run):
    result = run(["train.py", *tiny_run, "--out_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert result.returncode == 0, result.stderr
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    result = run(["train.py", *tiny_run, "--out_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert result.returncode == 2, result.stderr
    assert "already holds a checkpoint" in result.stderr, result.stderr
    assert "pass --resume" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def test_keep_n_keeps_the_newest(tmp_path, tiny_run):
    out = tmp_path / "out"
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "5", "--eval_interval", "1",
                  "--keep", "3"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt.pt", "ckpt_0000003.pt", "ckpt_0000004.pt",
                                                         "ckpt_0000005.pt"]
    assert titan.read_checkpoint(out / "ckpt_0000003.pt")["step"] == 3
    assert (out / "ckpt.pt").read_bytes() == (out / "ckpt_0000005.pt").read_bytes()

    # a resume without --keep keeps the run's 3; a finished run resumed from a numbered file names it
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "6", "--eval_interval", "1", "--resume"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000004.pt", "ckpt_0000005.pt", "ckpt_0000006.pt"]
    (out / "ckpt.pt").unlink()
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "6", "--resume"])
    assert result.returncode == 0, result.stderr
    assert "the run is already complete" in result.stdout, result.stdout
    assert f"checkpoint: {out / 'ckpt_0000006.pt'}" in result.stdout, result.stdout


def fake_checkpoint(step, size=4):
    return {"format": titan.CHECKPOINT_FORMAT, "step": step, "trainable": {"w": torch.full((size,), float(step))}}


def test_latest_skips_broken_newest(tmp_path):
    for step in (1, 2, 3):
        titan.save_checkpoint(fake_checkpoint(step), tmp_path, keep=3)
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")       # not how a save fails, but the fallback must hold
    (tmp_path / "ckpt_0000003.pt").unlink()
    warnings = []
    path, ckpt = titan.latest_checkpoint(tmp_path, log=warnings.append)
    assert (path.name, ckpt["step"]) == ("ckpt_0000002.pt", 2)
    assert "ckpt.pt" in warnings[0]


def test_latest_prefers_newer_numbered(tmp_path):
    # a kill between the two renames of a save leaves the new step under its numbered name only
    titan.save_checkpoint(fake_checkpoint(1), tmp_path, keep=2)
    titan.atomic_save(fake_checkpoint(2), tmp_path / "ckpt_0000002.pt")
    path, ckpt = titan.latest_checkpoint(tmp_path)
    assert (path.name, ckpt["step"]) == ("ckpt_0000002.pt", 2)


def test_latest_without_any_fails(tmp_path):
    with pytest.raises(ValueError, match="no loadable checkpoint"):
        titan.latest_checkpoint(tmp_path)


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    import errno
    titan.save_checkpoint(fake_checkpoint(1), tmp_path)
    before = (tmp_path / "ckpt.pt").read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(titan.os, "fsync", disk_full)
    with pytest.raises(OSError) as info:
        titan.save_checkpoint(fake_checkpoint(2), tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_full_disk_keeps_previous(tmp_path, tiny_run):
    # a real failing write: the file-size limit makes write() fail with EFBIG once the file grows
    import resource
    import signal
    out = tmp_path / "out"
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "2", "--eval_interval", "2"])
    assert result.returncode == 0, result.stderr
    before = (out / "ckpt.pt").read_bytes()
    limit = len(before) // 2

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "4",
                             "--eval_interval", "1", "--resume"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env, preexec_fn=limit_file_size)
    assert "failed (File too large); the checkpoint of step 2 is kept" in result.stderr, result.stderr
    assert "step 4: loss" in result.stdout, result.stdout          # the run carried on
    assert result.returncode == 2, result.stderr
    assert "the final save failed" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    assert not list(out.glob(".ckpt*"))


# Imports torch once, then forks one saver per line read: each saver resumes from the newest
# checkpoint and saves step after step until it is killed. Forking skips a 2 s import per kill.
KILL_SAVER = """
import os, sys, titan, torch
out, size = sys.argv[1], int(sys.argv[2])
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            step = titan.latest_checkpoint(out, log=lambda m: None)[1]["step"]
        except ValueError:
            step = 0
        while True:
            step += 1
            titan.save_checkpoint({"format": titan.CHECKPOINT_FORMAT, "step": step,
                                   "trainable": {"w": torch.full((size,), float(step))}}, out, keep=2)
            print("saved", step, flush=True)
    print("pid", pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_kill_during_save(tmp_path):
    """SIGKILL a saving process 20 times at random moments. After each kill, the newest complete
    checkpoint must load and hold the step it claims."""
    import signal
    import time
    rng = random.Random(0)
    size = 2_000_000
    zygote = subprocess.Popen([sys.executable, "-c", KILL_SAVER, str(tmp_path), str(size)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    mid_save, last = 0, None
    try:
        for kill in range(20):
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            lines = []
            while not (line := zygote.stdout.readline()).startswith("pid"):
                lines.append(line)
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(int(line.split()[1]), signal.SIGKILL)
            while (line := zygote.stdout.readline()) != "reaped\n":
                assert line, "the saver process ended on its own"
                lines.append(line)
            saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
            last = saved[-1] if saved else last
            mid_save += bool(list(tmp_path.glob(".ckpt*")))
            if last is None and not list(tmp_path.glob("ckpt*")):
                continue                    # killed before its first save finished
            path, ckpt = titan.latest_checkpoint(tmp_path)
            assert ckpt["step"] in (last, (last or 0) + 1), (kill, ckpt["step"], last)
            assert torch.equal(ckpt["trainable"]["w"], torch.full((size,), float(ckpt["step"]))), kill
            last = ckpt["step"]
    finally:
        zygote.kill()
        zygote.wait()
    assert last is not None and last >= 10, last
    assert mid_save >= 1, "no kill landed inside a save; the test did not exercise the window"


def test_torchrun_gloo_matches_one_process(tmp_path, tiny_run):
    """2 ranks at batch 2 each must follow a 1-process run at batch 4: same data, same averaged gradient."""
    flags = [*tiny_run, "--max_steps", "3", "--eval_interval", "100", "--load_balance_coef", "0"]
    one = run(["train.py", *flags, "--out_dir", str(tmp_path / "one"), "--batch_size", "4"])
    assert one.returncode == 0, one.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                          "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", *flags,
                          "--out_dir", str(tmp_path / "two"), "--batch_size", "2", "--backend", "gloo"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 ranks" in two.stdout, two.stdout
    assert two.stdout.count("SFT for 3 steps") == 1, "only rank 0 logs"
    a, b = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert math.isclose(a[s], b[s], rel_tol=1e-5), (s, a[s], b[s])
    w1 = titan.read_checkpoint(tmp_path / "one" / "ckpt.pt")["trainable"]
    w2 = titan.read_checkpoint(tmp_path / "two" / "ckpt.pt")["trainable"]
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5), name


def test_long_records_warn_once(tmp_path, tiny_run):
    with open(tmp_path / "data.jsonl", "a") as f:
        f.write(json.dumps({"question": "1+1", "reasoning": "1+1=2\n" * 40, "answer": "2"}) + "\n")
        f.write(json.dumps({"question": "9" * 80, "reasoning": "x", "answer": "1"}) + "\n")
    result = run(["train.py", *tiny_run, "--out_dir", str(tmp_path / "out"), "--max_steps", "12",
                  "--eval_interval", "12"])
    assert result.returncode == 0, result.stderr
    assert "warning: a record is longer than --seq_len 64 (question '1+1')" in result.stderr, result.stderr
    assert "warning: a record's prompt and answer alone are longer than --seq_len 64" in result.stderr
    assert result.stderr.count("warning: a record") == 2, "each warning once"
    assert "records cut by" in result.stdout, result.stdout
    assert "skipped to fit --seq_len 64" in result.stdout, result.stdout


def test_sample_prompt_budget(tmp_path, tiny_run):
    out = tmp_path / "out"
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "1"])
    assert result.returncode == 0, result.stderr
    result = run(["sample.py", "--ckpt", str(out / "ckpt.pt"), "--prompt", "1+" * 40])
    assert result.returncode == 2, result.stderr
    assert "--prompt is 98 tokens, which leaves no room in the budget of 64 tokens" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    result = run(["sample.py", "--ckpt", str(out / "ckpt.pt"), "--prompt", "1+2", "--max_new_tokens", "100"])
    assert result.returncode == 0, result.stderr
    assert "--max_new_tokens lowered to 43" in result.stderr, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--inject_layer", "0"], "--inject_layer 0 is outside [1, 1]"),
    (["--inject_layer", "2"], "--inject_layer 2 is outside [1, 1]"),
    (["--moe_scale", "-1"], "--moe_scale -1.0 must be a finite number >= 0"),
])
def test_train_flag_out_of_range(tmp_path, tiny_run, flags, message):
    result = run(["train.py", *tiny_run, "--out_dir", str(tmp_path / "out"), *flags])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_out_dir(tmp_path, tiny_run):
    (tmp_path / "file").write_text("")
    result = run(["train.py", *tiny_run, "--out_dir", str(tmp_path / "file" / "out")])
    assert result.returncode == 2, result.stderr
    assert "is not writable" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_resume_with_other_config_names_fields(tmp_path, tiny_run):
    out = tmp_path / "out"
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "1"])
    assert result.returncode == 0, result.stderr
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "2", "--resume", "--d_bridge", "8",
                  "--top_k", "3"])
    assert result.returncode == 2, result.stderr
    assert "d_bridge (checkpoint 16, now 8), top_k (checkpoint 2, now 3)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    result = run(["train.py", *tiny_run, "--out_dir", str(out), "--max_steps", "2", "--resume", "--batch_size", "2"])
    assert result.returncode == 2, result.stderr
    assert "other data settings: --batch_size (checkpoint 4, now 2)" in result.stderr, result.stderr


def test_sample_rejects_empty_prompt(tmp_path):
    result = run(["sample.py", "--ckpt", str(tmp_path / "none.pt"), "--prompt", ""])
    assert result.returncode == 2, result.stderr
    assert "--prompt is empty" in result.stderr, result.stderr
