"""Titan: a frozen Mamba-1 language model with a grafted mixture of arms.

Data flow, top to bottom:

    token ids
      -> embedding            frozen backbone rows + trainable rows for <think>, </think>, <|end|>
      -> layers [0, inject)   frozen Mamba blocks, run without autograd during training
      -> mixture of arms      bridge down -> 8 Mamba arms -> router top-k -> Blackboard -> bridge up
         x = x + moe_scale * up(mixture)        (up starts at zero, so a fresh Titan is its backbone)
      -> layers [inject, n)   frozen Mamba blocks, activation-checkpointed during training
      -> final RMSNorm -> tied LM head          logits over the backbone vocabulary + the 3 new tokens

Only the arms, the bridge, the router, the Blackboard and the three new token rows train.

Shape glossary (the letters in the shape comments):
    b   batch size
    l   sequence length (time)
    d   d_model, the residual stream width
    e   d_inner = expand * d_model, the width the selective scan runs at
    n   d_state, the SSM state size per channel (N in the Mamba paper)
    r   dt_rank, the rank of the low-rank projection that produces Δ
    k   d_conv, the causal convolution width
    a   n_arms
    c   d_bridge, the width the arms work at
    s   d_blackboard, the width of the Blackboard bus
    v   vocabulary size

The Mamba paper's symbols map to code as Δ -> delta, A -> A (stored as A_log), B -> B, C -> C,
D -> D, x -> u (the scan input) and h -> the SSM state.
"""

import dataclasses
import hashlib
import http.client
import io
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import struct
import sys
import time
import unicodedata
import urllib.error
import urllib.request
import zipfile
from urllib.parse import urlparse

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MambaConfig:
    """Shape of a Mamba-1 backbone; the defaults are those of the state-spaces checkpoints."""
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277          # the tokenizer's size; the embedding is padded above it
    pad_vocab_size_multiple: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0                 # 0 means ceil(d_model / 16)
    norm_eps: float = 1e-5
    embedding_rows: int = 0          # 0 means vocab_size padded up to pad_vocab_size_multiple

    def __post_init__(self):
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_size_multiple
        return self.embedding_rows or (self.vocab_size + m - 1) // m * m


@dataclasses.dataclass
class TitanConfig:
    """Everything grafted onto the backbone. `inject_layer` 0 means n_layer // 2."""
    backbone: MambaConfig = dataclasses.field(default_factory=MambaConfig)
    inject_layer: int = 0
    d_bridge: int = 512
    n_arms: int = 8
    top_k: int = 2
    d_blackboard: int = 64
    moe_scale: float = 1.0
    blackboard: bool = True
    arm_d_state: int = 16
    load_balance_coef: float = 0.01

    def __post_init__(self):
        if isinstance(self.backbone, dict):
            self.backbone = MambaConfig(**self.backbone)
        if self.inject_layer == 0:
            self.inject_layer = self.backbone.n_layer // 2

    def validate(self):
        """Raise ValueError naming the first invalid field and how to fix it."""
        n_layer = self.backbone.n_layer
        if not 1 <= self.inject_layer <= n_layer - 1:
            raise ValueError(f"inject_layer {self.inject_layer} is outside [1, {n_layer - 1}] "
                             f"for a backbone of {n_layer} layers; pick a layer inside that range")
        if self.n_arms < 1:
            raise ValueError(f"n_arms {self.n_arms} must be at least 1")
        if not 1 <= self.top_k <= self.n_arms:
            raise ValueError(f"top_k {self.top_k} must be between 1 and n_arms ({self.n_arms})")
        if not math.isfinite(self.moe_scale) or self.moe_scale < 0:
            raise ValueError(f"moe_scale {self.moe_scale} must be a finite number >= 0")
        for name in ("d_bridge", "d_blackboard", "arm_d_state"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")

    def to_dict(self):
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Selective scan
#
#   h_t = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t        (per channel e, per state index n)
#   y_t = C_t · h_t
#
# Two implementations with one contract: the readable reference below, and a chunked scan with
# a hand-written backward for training. Both take an initial state and return the final state,
# so that a prompt processed in one call hands its state over to token-by-token generation.
# The skip term D * u is added by the mixer, not by the scans.
# ---------------------------------------------------------------------------------------------

def selective_scan_ref(u, delta, A, B, C, h0=None):
    """Run the recurrence one time step at a time with autograd; the reference for tests.

    u, delta: (b, l, e)   A: (e, n)   B, C: (b, l, n)   h0: (b, e, n) or None
    Returns y (b, l, e) and the final state (b, e, n), both float32 or wider.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    b, l, e = u.shape
    h = u.new_zeros(b, e, A.shape[1]) if h0 is None else h0.to(dtype)

    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, t, :, None] * A)                              # (b, e, n)
        dBu = delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]      # (b, e, n)
        h = dA * h + dBu
        ys.append((h * C[:, t, None, :]).sum(-1))                             # (b, e)
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(b, 0, e)               # (b, l, e)
    return y, h


def _discretize(u, delta, A, B):
    """Return exp(ΔA) and ΔB·u for one chunk, time-major: (t, b, e, n) each."""
    delta_t = delta.transpose(0, 1).contiguous()                              # (t, b, e)
    dA = (delta_t[..., None] * A).exp_()                                      # (t, b, e, n)
    dBu = (delta_t * u.transpose(0, 1))[..., None] * B.transpose(0, 1)[:, :, None, :].contiguous()
    return dA, dBu


def _scan_chunk(dA, dBu, h):
    """Run one chunk from state h (b, e, n), overwriting dBu[t] with the state after step t.

    Each ΔB·u term is read once, at its own step, so its buffer can hold the states.
    """
    for t in range(dA.shape[0]):
        h = torch.addcmul(dBu[t], dA[t], h, out=dBu[t])
    return h


class _ChunkedScan(torch.autograd.Function):
    """Selective scan in chunks of time, with the reverse recurrence written out for backward.

    Memory stays bounded: the (b, l, e, n) state tensor exists for one chunk at a time, and
    backward recomputes each chunk's states from the chunk's saved starting state. The last
    chunk is simply shorter, so any length works and nothing is ever padded. All arithmetic runs
    in float32 (or float64 if the inputs are), with autocast switched off, so the state never
    drops to bf16.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk):
        dtype = torch.promote_types(u.dtype, torch.float32)
        in_dtypes = [t.dtype for t in (u, delta, A, B, C, h0)]
        with torch.autocast(u.device.type, enabled=False):
            u, delta, A, B, C, h0 = (t.to(dtype) for t in (u, delta, A, B, C, h0))
            b, l, e = u.shape
            y = u.new_empty(b, l, e)
            starts = []                       # the state entering each chunk, for backward
            h = h0
            for s in range(0, l, chunk):
                starts.append(h)
                dA, hs = _discretize(u[:, s:s + chunk], delta[:, s:s + chunk], A, B[:, s:s + chunk])
                h = _scan_chunk(dA, hs, h).clone()
                # y_t = C_t · h_t
                y[:, s:s + chunk] = (hs * C[:, s:s + chunk].transpose(0, 1)[:, :, None, :]).sum(-1).transpose(0, 1)
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        ctx.chunk, ctx.in_dtypes = chunk, in_dtypes
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_last):
        u, delta, A, B, C, *starts = ctx.saved_tensors
        chunk = ctx.chunk
        b, l, e = u.shape
        n = A.shape[1]
        with torch.autocast(u.device.type, enabled=False):
            dy = dy.to(u.dtype)
            # g carries dL/dh_t backwards in time; past the last step only h_last's gradient flows
            g = dh_last.to(u.dtype) if dh_last is not None else u.new_zeros(b, e, n)
            du, ddelta = torch.empty_like(u), torch.empty_like(delta)
            dB, dC = torch.empty_like(B), torch.empty_like(C)
            dA_param = torch.zeros_like(A)

            for i in reversed(range(len(starts))):
                sl = slice(i * chunk, (i + 1) * chunk)
                u_c, delta_c, B_c, C_c = u[:, sl], delta[:, sl], B[:, sl], C[:, sl]
                dA, hs = _discretize(u_c, delta_c, A, B_c)
                _scan_chunk(dA, hs, starts[i])                                # recompute the states
                # time-major copies of the small per-step tensors
                dy_t, B_t, C_t = (t.transpose(0, 1).contiguous() for t in (dy[:, sl], B_c, C_c))
                delta_t = delta_c.transpose(0, 1).contiguous()                   # (t, b, e)
                deltau_t = delta_t * u_c.transpose(0, 1)

                # dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) dL/dh_{t+1}
                gs = dy_t[..., None] * C_t[:, :, None, :]                       # (t, b, e, n)
                gs[-1] += g
                for t in range(gs.shape[0] - 2, -1, -1):
                    torch.addcmul(gs[t], dA[t + 1], gs[t + 1], out=gs[t])
                g = dA[0] * gs[0]             # what flows into the previous chunk's last state

                # dL/d(ΔA) = dL/dh_t * h_{t-1} * exp(ΔA), built in place in dA's buffer
                g_dA = dA.mul_(gs)
                g_dA[1:] *= hs[:-1]
                g_dA[0] *= starts[i]

                # reductions over n, e or time; each makes one chunk-sized temporary at most
                gB = (gs * B_t[:, :, None, :]).sum(-1)                            # (t, b, e)
                ddelta[:, sl] = ((g_dA * A).sum(-1) + gB * u_c.transpose(0, 1)).transpose(0, 1)
                du[:, sl] = (gB * delta_t).transpose(0, 1)
                dA_param += (g_dA * delta_t[..., None]).sum((0, 1))
                dB[:, sl] = (gs * deltau_t[..., None]).sum(2).transpose(0, 1)     # (b, t, n)
                dC[:, sl] = (hs * dy_t[..., None]).sum(2).transpose(0, 1)

        grads = (du, ddelta, dA_param, dB, dC, g)
        return (*(gr.to(dt) for gr, dt in zip(grads, ctx.in_dtypes)), None)


SCAN_CHUNK_ELEMENTS = 1 << 19      # state elements per chunk of the fast scan


def selective_scan(u, delta, A, B, C, h0=None, chunk=None):
    """Chunked selective scan with the same contract as selective_scan_ref; used for training.

    The default chunk contains about 2^19 state elements (b * chunk * e * n), between 4 and 64
    steps, so the per-chunk buffers stay about 2 MB whatever the batch size. A single step without
    autograd (token-by-token decoding) runs the reference's one-step update directly, because
    the chunk machinery only adds overhead there.
    """
    if u.shape[1] == 1 and not torch.is_grad_enabled():
        return selective_scan_ref(u, delta, A, B, C, h0)
    if chunk is None:
        chunk = max(4, min(64, SCAN_CHUNK_ELEMENTS // (u.shape[0] * u.shape[2] * A.shape[1])))
    if h0 is None:
        h0 = u.new_zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.promote_types(u.dtype, torch.float32))
    return _ChunkedScan.apply(u, delta, A, B, C, h0, chunk)


# ---------------------------------------------------------------------------------------------
# Mamba block
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the weight and input dtypes."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class MambaMixer(nn.Module):
    """The Mamba-1 mixer: gated selective SSM with a causal depthwise convolution.

    `forward` takes a whole sequence and an optional carried state; decoding one token is the
    same call with l = 1, so prefill and generation share every line of Δ, conv and scan code.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank=0,
                 dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        e, n, r = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, kernel_size=d_conv, groups=e, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.out_proj = nn.Linear(e, d_model, bias=False)

        # Δ starts log-uniform in [dt_min, dt_max]; the bias stores softplus^-1(Δ) so that
        # softplus(bias) recovers it. dt_proj.weight starts at the scale that keeps dt_rank inputs
        # from moving Δ far off that range.
        nn.init.uniform_(self.dt_proj.weight, -r ** -0.5, r ** -0.5)
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

        # A = -exp(A_log) = -(1, 2, ..., n) in every channel: the S4D-real initialisation
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))

    def ssm_params(self, x):
        """Return Δ (b, l, e) in float32, and B, C (b, l, n), for the conv output x (b, l, e)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # the bias is added in float32 after the matmul, because dt_proj.bias stays float32
        # even when the frozen weights are bf16
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        return delta, B, C

    def forward(self, x, state=None, scan=selective_scan):
        """x: (b, l, d). state: None or (conv_state (b, e, k-1), ssm_state (b, e, n)).

        Returns the output (b, l, d) and the state after the last position.
        """
        b, l, _ = x.shape

        # 1. input projection, split into the SSM branch x and the gate z
        xz = self.in_proj(x)                                                  # (b, l, 2e)
        x, z = xz.chunk(2, dim=-1)                                            # (b, l, e) each

        # 2. causal depthwise conv; a carried conv_state supplies the previous k-1 inputs
        x = x.transpose(1, 2)                                                 # (b, e, l)
        if state is None:
            context = F.pad(x, (self.d_conv - 1, 0))                          # (b, e, l+k-1)
            h0 = None
        else:
            context = torch.cat([state[0].to(x.dtype), x], dim=-1)
            h0 = state[1]
        conv_state = context[..., -(self.d_conv - 1):]                        # (b, e, k-1)
        if l == 1:
            # one output position is a dot product per channel; conv1d's setup costs more than it
            x = (context * self.conv1d.weight[:, 0]).sum(-1, keepdim=True) + self.conv1d.bias[:, None]
        else:
            x = F.conv1d(context, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        x = F.silu(x.transpose(1, 2))                                         # (b, l, e)

        # 3. selection: Δ, B and C depend on the input
        delta, B, C = self.ssm_params(x)

        # 4. discretisation and recurrence, in float32; A = -exp(A_log) is always float32
        A = -torch.exp(self.A_log.float())                                    # (e, n)
        y, ssm_state = scan(x, delta, A, B, C, h0)                            # (b, l, e)

        # 5. skip connection D, gate by SiLU(z), output projection
        y = y + x.float() * self.D.float()
        y = y * F.silu(z.float())
        return self.out_proj(y), (conv_state, ssm_state)


class MambaBlock(nn.Module):
    """Pre-norm wrapper: RMSNorm then mixer. The caller adds the result to its residual stream."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank=0, norm_eps=1e-5):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = MambaMixer(d_model, d_state, d_conv, expand, dt_rank)

    def forward(self, x, state=None):
        return self.mixer(self.norm(x), state)


# ---------------------------------------------------------------------------------------------
# Backbone: embedding, residual Mamba layers, final norm, tied head
# ---------------------------------------------------------------------------------------------

class MambaLM(nn.Module):
    """A Mamba-1 language model laid out like the state-spaces checkpoints.

    Parameter names match theirs (`backbone.embedding.weight`, `backbone.layers.N.mixer.A_log`,
    ...), so a checkpoint loads with a plain strict load_state_dict. The head is the embedding
    itself (tied), so `lm_head.weight` is not a separate parameter.
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.backbone.layers = nn.ModuleList(
            MambaBlock(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank, cfg.norm_eps)
            for _ in range(cfg.n_layer))
        self.backbone.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

        # GPT-2-style initialisation, applied per module so that dt_proj.bias keeps its own init:
        # small embeddings, and out_proj scaled down by sqrt(n_layer) so the residual stream
        # does not grow with depth at the start of training
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for layer in self.backbone.layers:
            layer.mixer.out_proj.weight.data /= math.sqrt(cfg.n_layer)

    @property
    def embedding(self):
        return self.backbone.embedding

    @property
    def layers(self):
        return self.backbone.layers

    @property
    def norm_f(self):
        return self.backbone.norm_f

    def forward(self, ids, states=None):
        """ids: (b, l). Returns logits (b, l, padded vocab) and the per-layer states."""
        x = self.embedding(ids).float()                                       # (b, l, d)
        new_states = []
        for i, layer in enumerate(self.layers):
            y, state = layer(x, None if states is None else states[i])
            x = x + y
            new_states.append(state)
        return F.linear(self.norm_f(x), self.embedding.weight), new_states


# ---------------------------------------------------------------------------------------------
# Mixture of arms, Blackboard, scaled bridge
# ---------------------------------------------------------------------------------------------

def load_balance_loss(router_probs, topk_idx, n_arms):
    """Switch-Transformer balance loss: n_arms * Σ_i f_i P_i.

    f_i is the share of routing slots (token, choice) that went to arm i, and P_i the mean router
    probability of arm i. Perfectly even routing gives exactly 1.0, and all tokens on one arm
    (with top_k = 1) gives n_arms.
    router_probs: (..., a)   topk_idx: (..., top_k)
    """
    probs = router_probs.reshape(-1, n_arms)
    counts = F.one_hot(topk_idx.reshape(-1), n_arms).float().sum(0)          # (a,)
    f = counts / counts.sum()
    P = probs.float().mean(0)
    return n_arms * (f * P).sum()


class Blackboard(nn.Module):
    """A latent bus that every active arm writes to and reads back from, at each position.

    write: each arm projects its output to d_blackboard, scaled by its router gate, and the bus
    is the sum over arms (inactive arms have gate 0, so they write nothing). read: each arm
    projects the bus back to d_bridge through a sigmoid gate of its own. The gates start at
    sigmoid(4) ≈ 0.98, open ("hot"), so the bus is used from the first step and training can close
    it. The bus mixes arms within one position only, so it stays causal and needs no state.
    """

    def __init__(self, n_arms, d_bridge, d_blackboard):
        super().__init__()
        self.write = nn.Parameter(torch.randn(n_arms, d_bridge, d_blackboard) * d_bridge ** -0.5)
        self.read = nn.Parameter(torch.randn(n_arms, d_blackboard, d_bridge) * d_blackboard ** -0.5)
        self.read_gate = nn.Parameter(torch.full((n_arms,), 4.0))

    def forward(self, arm_out, gates):
        """arm_out: (b, l, a, c), gates: (b, l, a). Returns the read-back (b, l, a, c)."""
        bus = torch.einsum("blac,acs,bla->bls", arm_out, self.write, gates)  # (b, l, s)
        back = torch.einsum("bls,asc->blac", bus, self.read)                  # (b, l, a, c)
        return back * torch.sigmoid(self.read_gate)[:, None]


class MixtureOfArms(nn.Module):
    """Bridge down, 8 Mamba arms, top-k router, Blackboard, bridge up.

    NOTE: every arm runs on every token, so that each arm's recurrent state covers the whole
    sequence. Top-k only selects which arm outputs are mixed in. Skipping unselected arms would
    save compute but leave holes in their states.
    """

    def __init__(self, cfg: TitanConfig):
        super().__init__()
        d, c = cfg.backbone.d_model, cfg.d_bridge
        self.n_arms, self.top_k = cfg.n_arms, cfg.top_k
        self.norm = RMSNorm(d, eps=cfg.backbone.norm_eps)
        self.down = nn.Linear(d, c, bias=False)
        self.router = nn.Linear(c, cfg.n_arms, bias=False)
        self.arms = nn.ModuleList(MambaBlock(c, d_state=cfg.arm_d_state) for _ in range(cfg.n_arms))
        self.blackboard = Blackboard(cfg.n_arms, c, cfg.d_blackboard)
        self.up = nn.Linear(c, d, bias=False)
        nn.init.zeros_(self.up.weight)        # a fresh Titan adds exactly zero to the backbone
        # near-even routing at the start, with enough spread that ties do not always pick the same arms
        nn.init.normal_(self.router.weight, std=0.02)

    def forward(self, x, states=None, use_blackboard=True, probe=None):
        """x: residual stream (b, l, d). Returns the unscaled injection (b, l, d), the
        load-balance loss, and the arms' states."""
        u = self.down(self.norm(x))                                           # (b, l, c)

        # router: softmax over arms, keep the top_k, renormalise their weights to sum to 1
        probs = F.softmax(self.router(u).float(), dim=-1)                     # (b, l, a)
        top_p, top_i = probs.topk(self.top_k, dim=-1)                         # (b, l, top_k)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        aux = load_balance_loss(probs, top_i, self.n_arms)

        outs, new_states = [], []
        for i, arm in enumerate(self.arms):
            o, state = arm(u, None if states is None else states[i])
            outs.append(o.float())
            new_states.append(state)
        arm_out = torch.stack(outs, dim=2)                                    # (b, l, a, c)

        back = self.blackboard(arm_out, gates) if use_blackboard else torch.zeros_like(arm_out)
        mixed = torch.einsum("bla,blac->blc", gates, arm_out + back)          # (b, l, c)
        injection = self.up(mixed)                                            # (b, l, d)

        if probe is not None:
            probe["router_probs"] = probs.detach()
            probe["gates"] = gates.detach()
            probe["arm_out"] = arm_out.detach()
            probe["readback"] = back.detach()
            probe["read_gate"] = torch.sigmoid(self.blackboard.read_gate).detach()
        return injection, aux, new_states


# ---------------------------------------------------------------------------------------------
# Titan: the frozen backbone with the arms grafted on
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<think>", "</think>", "<|end|>")
CE_CHUNK_LOGITS = 1 << 24            # logits per chunk of Titan.cross_entropy_sum

# parameters that stay float32 when frozen weights are cast to bf16 or fp16: they feed exp()
# and softplus() inside the scan, where 8 bits of mantissa visibly move the state
FP32_PARAM_SUFFIXES = ("A_log", "D", "dt_proj.bias")


class Titan(nn.Module):
    """The frozen backbone, the mixture of arms at `inject_layer`, and three new token rows.

    Token ids below `backbone.vocab_size` use the frozen embedding and head rows; ids
    vocab_size + 0, 1, 2 are <think>, </think> and <|end|>, whose rows (tied between input and
    head, like the backbone's) train. Embedding rows between the tokenizer size and the padded
    size are never produced: the head returns logits for the real ids only.
    """

    def __init__(self, cfg: TitanConfig, backbone: MambaLM):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.lm = backbone
        for p in self.lm.parameters():
            p.requires_grad_(False)
        # Frozen matrices that widen (in_proj, dt_proj, and the embedding as the head) keep their
        # shapes but are stored transposed (column-major), so F.linear multiplies by a row-major
        # (in, out) matrix. For one token, MKL's matrix-vector product on this CPU ran that
        # layout 1.3x (in_proj) to 1.9x (head) faster. Narrowing matrices ran slower that way,
        # so they keep their layout. Whole sequences run at the same speed either way.
        for m in self.lm.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[0] > m.weight.shape[1]:
                m.weight.data = m.weight.data.t().contiguous().t()
        self.arms = MixtureOfArms(cfg)
        self.moe_scale = cfg.moe_scale
        self.use_blackboard = cfg.blackboard
        self.checkpointing = True       # activation checkpointing above the injection layer
        self.ce_chunk = None            # positions per head chunk in cross_entropy_sum (None: auto)

        # the new rows start at the mean backbone embedding plus a little noise: a typical
        # direction, so they neither dominate nor vanish in the head at the start
        emb = backbone.embedding.weight[:cfg.backbone.vocab_size].detach().float()
        init = emb.mean(0) + 0.1 * emb.std(0) * torch.randn(len(SPECIAL_TOKENS), emb.shape[1])
        self.special = nn.Parameter(init)

    @property
    def vocab_size(self):
        """Number of ids Titan reads and predicts: the tokenizer's plus the 3 new tokens."""
        return self.cfg.backbone.vocab_size + len(SPECIAL_TOKENS)

    def embed(self, ids):
        v = self.cfg.backbone.vocab_size
        base = self.lm.embedding(ids.clamp(max=v - 1)).float()               # (b, l, d)
        new = self.special[(ids - v).clamp(min=0, max=len(SPECIAL_TOKENS) - 1)]
        return torch.where((ids >= v)[..., None], new.to(base.dtype), base)

    def head_weight(self):
        """Return the LM head (v, d): frozen backbone rows for real ids, then the 3 new rows."""
        w = self.lm.embedding.weight[:self.cfg.backbone.vocab_size]
        return torch.cat([w, self.special.to(w.dtype)], dim=0)

    def head(self, x):
        # two products then a concatenation of logits, so the large frozen head is never copied
        h = self.lm.norm_f(x)
        frozen = F.linear(h, self.lm.embedding.weight[:self.cfg.backbone.vocab_size])
        return torch.cat([frozen, F.linear(h, self.special.to(frozen.dtype))], dim=-1)

    def cross_entropy_sum(self, x, targets):
        """Sum the head's cross-entropy on final hidden states x (b, l, d) against targets
        (b, l), where -100 marks positions without a target.

        The head runs on chunks of positions, each checkpointed, so the (b, l, v) logits never
        exist at once. Training keeps one chunk's logits, their float32 copy and gradient alive,
        about 2^24 logits (64 MB) each by default.
        """
        x, targets = x.flatten(0, 1), targets.flatten()
        chunk = self.ce_chunk or max(1, CE_CHUNK_LOGITS // self.vocab_size)

        def part(h, t):
            return F.cross_entropy(self.head(h).float(), t, ignore_index=-100, reduction="sum")
        total = 0.0
        for s in range(0, len(x), chunk):
            if torch.is_grad_enabled():
                total = total + torch.utils.checkpoint.checkpoint(part, x[s:s + chunk], targets[s:s + chunk],
                                                                  use_reentrant=False)
            else:
                total = total + part(x[s:s + chunk], targets[s:s + chunk])
        return total

    def forward(self, ids, cache=None, moe_scale=None, use_blackboard=None, probe=None, targets=None):
        """ids: (b, l). cache: None or the state returned by an earlier call.

        Returns logits (b, l, v), the router's load-balance loss, and the new cache.
        With targets (b, l), the first result is instead the summed cross-entropy from
        cross_entropy_sum, which never builds the whole logits tensor.
        With a dict as `probe`, also records the residual norm after every layer and the
        arms' internals, for inspection.
        """
        moe_scale = self.moe_scale if moe_scale is None else moe_scale
        use_blackboard = self.use_blackboard if use_blackboard is None else use_blackboard
        inject = self.cfg.inject_layer
        grad = torch.is_grad_enabled()
        new_cache = {"layers": [], "arms": None}

        def run_layer(i, x):
            y, state = self.lm.layers[i](x, None if cache is None else cache["layers"][i])
            new_cache["layers"].append(state)
            return x + y

        def record(name, x):
            if probe is not None:
                probe.setdefault(name, []).append(x.detach().norm(dim=-1))

        # frozen layers below the injection point need no autograd graph, because nothing
        # below them trains. NOTE: this also means the 3 new token rows learn through the head
        # only; their use as inputs below the injection layer is not differentiated.
        with torch.no_grad():
            x = self.embed(ids)
            record("residual", x)
            for i in range(inject):
                x = run_layer(i, x)
                record("residual", x)

        injection, aux, arm_states = self.arms(
            x, None if cache is None else cache["arms"], use_blackboard, probe)
        new_cache["arms"] = arm_states
        scaled = moe_scale * injection
        if probe is not None:
            probe["injected"] = scaled.detach().norm(dim=-1)
            probe["residual_at_inject"] = x.detach().norm(dim=-1)
        x = x + scaled

        for i in range(inject, self.cfg.backbone.n_layer):
            if grad and self.checkpointing and cache is None:
                layer = self.lm.layers[i]
                x = x + torch.utils.checkpoint.checkpoint(lambda t, m=layer: m(t)[0], x, use_reentrant=False)
                new_cache["layers"].append(None)
            else:
                x = run_layer(i, x)
            record("residual", x)

        if probe is not None:
            probe["final_hidden"] = x.detach()
        if targets is not None:
            return self.cross_entropy_sum(x, targets), aux, new_cache
        return self.head(x), aux, new_cache

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self):
        """Return the weights a checkpoint stores: everything outside the frozen backbone."""
        return {k: v.detach().clone() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, state, source="checkpoint"):
        expected = {k: tuple(v.shape) for k, v in self.named_parameters() if v.requires_grad}
        check_state_dict(expected, state, source)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def cast_frozen(self, dtype):
        """Store the frozen backbone in `dtype`, except A_log, D and the dt bias (float32)."""
        for name, p in self.lm.named_parameters():
            if not name.endswith(FP32_PARAM_SUFFIXES):
                p.data = p.data.to(dtype)
        return self


# ---------------------------------------------------------------------------------------------
# Loading backbones and checkpoints
# ---------------------------------------------------------------------------------------------

def atomic_save(obj, path, link_as=None):
    """torch.save to a temporary file beside `path`, fsync it, then rename it into place.

    A crash or a full disk leaves either the old file or the new one at `path`, never half
    of one. The object is serialised in memory first, so that a failed write surfaces as an
    OSError that names the cause (torch's own file writer reports only a position mismatch).
    With `link_as`, the finished file also appears under that second name before the rename.
    The temporary file is removed if writing fails.
    """
    path = pathlib.Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if link_as is not None:
            _link_or_copy(tmp, pathlib.Path(link_as))
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _link_or_copy(src: pathlib.Path, dest: pathlib.Path):
    """Make `dest` a second name of `src` (a hard link, no extra disk), or an atomic copy where
    the file system has no hard links."""
    part = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    part.unlink(missing_ok=True)
    try:
        os.link(src, part)
    except OSError:
        shutil.copyfile(src, part)
    os.replace(part, dest)


def _fsync_folder(folder: pathlib.Path):
    """Make a rename inside `folder` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


CHECKPOINT_NAME = "ckpt.pt"
_NUMBERED_CHECKPOINT = re.compile(r"ckpt_(\d+)\.pt")


def save_checkpoint(ckpt, out_dir, keep=1):
    """Write a training checkpoint as out_dir/ckpt.pt and keep the `keep` newest ones.

    ckpt.pt is always the newest. With keep > 1 each save also appears as ckpt_{step:07d}.pt
    (a hard link to the same bytes) and the oldest numbered files beyond `keep` are deleted.
    Every file is complete whenever it is visible: a kill at any point leaves the previous
    checkpoint, or the new one, loadable (see latest_checkpoint). Raises OSError if the disk
    is full or the folder unwritable; the previous checkpoint then stays as it was.
    """
    out_dir = pathlib.Path(out_dir)
    for stale in out_dir.glob(".ckpt*.tmp*"):       # left by a run killed while saving
        stale.unlink(missing_ok=True)
    numbered = out_dir / f"ckpt_{ckpt['step']:07d}.pt" if keep > 1 else None
    atomic_save(ckpt, out_dir / CHECKPOINT_NAME, link_as=numbered)
    kept = keep if keep > 1 else 0                  # with keep 1, ckpt.pt alone
    for _, path in sorted(numbered_checkpoints(out_dir), reverse=True)[kept:]:
        path.unlink(missing_ok=True)


def numbered_checkpoints(out_dir):
    """List (step, path) for every ckpt_{step}.pt in out_dir."""
    found = []
    for path in pathlib.Path(out_dir).glob("ckpt_*.pt"):
        match = _NUMBERED_CHECKPOINT.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def latest_checkpoint(out_dir, log=print):
    """Load the newest readable checkpoint in out_dir. Returns (path, checkpoint).

    ckpt.pt is tried first. A numbered file with a larger step wins over it: a save killed
    between its two renames leaves one. If ckpt.pt does not read, the numbered files are tried,
    newest first.
    Raises ValueError naming every file tried if none loads.
    """
    out_dir = pathlib.Path(out_dir)
    problems, newest_step = [], -1
    main = out_dir / CHECKPOINT_NAME
    best = None
    if main.exists():
        try:
            best = (main, read_checkpoint(main))
            newest_step = best[1]["step"]
        except ValueError as err:
            problems.append(str(err))
    for step, path in sorted(numbered_checkpoints(out_dir), reverse=True):
        if step <= newest_step:
            break
        try:
            best = (path, read_checkpoint(path))
            break
        except ValueError as err:
            problems.append(str(err))
    if best is None:
        tried = "; ".join(problems) if problems else f"no {CHECKPOINT_NAME} or ckpt_*.pt there"
        raise ValueError(f"no loadable checkpoint in {out_dir} ({tried})")
    for problem in problems:
        log(f"warning: {problem}; using {best[0]}")
    return best


def save_backbone(model: MambaLM, folder):
    """Write `model` in the state-spaces layout: config.json and pytorch_model.bin."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    config = {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
              "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
              "ssm_cfg": {"d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand,
                          "dt_rank": cfg.dt_rank},
              "norm_epsilon": cfg.norm_eps, "rms_norm": True, "tie_embeddings": True}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    atomic_save(state, folder / "pytorch_model.bin")
    tmp = folder / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder / "config.json")


HUB_ENDPOINT = "https://huggingface.co"
# Weight files in the order they are tried. The state-spaces repos ship pytorch_model.bin.
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "model.safetensors.index.json")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_LOCAL_SUFFIXES = (".bin", ".safetensors", ".json", ".pt", ".pth")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """Error for a failed download, with `status` set to the HTTP status code or None if there was none."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class CheckpointError(ValueError):
    """A checkpoint or config file that is corrupt, unsupported, or does not fit the model."""


class _ConnectionDropped(Exception):
    """Error for a response body that ended early, after which the partial file is kept for resuming."""


def hub_cache_dir() -> pathlib.Path:
    """Return the download cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/titan/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return pathlib.Path.home() / ".cache" / "titan" / "hub"


def resolve_backbone(spec: str, files_needed=("config.json",), optional_files=("tokenizer.json",),
                     progress: bool = True) -> pathlib.Path:
    """Return a local folder with the backbone files that `spec` names, downloading them if needed.

    `spec` is a folder, a file inside one, or a hub repo id such as state-spaces/mamba-1.4b.
    A repo is cached in hub_cache_dir()/<owner>--<name>. Once `files_needed` and a complete set
    of weights are there, no network request is made, so a missing optional file is not retried.
    """
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    if not _REPO_ID.fullmatch(spec) or spec.endswith(_LOCAL_SUFFIXES):
        raise FileNotFoundError(f"--backbone {spec}: no such file or folder, and not a hub repo id "
                                "like state-spaces/mamba-1.4b")

    folder = hub_cache_dir() / spec.replace("/", "--")
    if all((folder / name).is_file() for name in files_needed) and _find_weights(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    endpoint = os.environ.get("HF_ENDPOINT", HUB_ENDPOINT).rstrip("/")

    def fetch(name: str, optional: bool = False, repo: str = spec) -> bool:
        """Download `name` unless it is cached. Return False if it is optional and the hub has no such file."""
        if (folder / name).is_file():
            return True
        try:
            download_file(f"{endpoint}/{repo}/resolve/main/{name}", folder / name, progress=progress)
            return True
        except DownloadError as error:
            if optional and error.status == 404:
                return False
            advice = "check the repo id" if error.status == 404 else "check the network"
            raise DownloadError(f"--backbone {spec}: {name} not found in cache {folder} and the download "
                                f"failed ({error}); {advice} or pass a local folder", error.status) from error

    for name in files_needed:
        fetch(name)
    for name in optional_files:
        fetch(name, optional=True)
    # the state-spaces repos ship no tokenizer.json, but their transformers twins (<repo>-hf) do
    if "tokenizer.json" in optional_files and not spec.endswith("-hf"):
        fetch("tokenizer.json", optional=True, repo=spec + "-hf")
    if _find_weights(folder) is None and not (fetch(WEIGHT_FILES[0], True) or fetch(WEIGHT_FILES[1], True)):
        if not fetch(WEIGHT_FILES[2], True):
            raise DownloadError(f"--backbone {spec}: {endpoint} has none of the weight files "
                                f"{', '.join(WEIGHT_FILES)}; is the repo id right?", 404)
        for shard in _shard_names(folder / WEIGHT_FILES[2]):
            fetch(shard)
    return folder


class _Progress:
    """One status line on stderr: redrawn in place 4 times a second on a terminal, every 30 s in a log."""

    def __init__(self, name: str, total: int | None, done: int, enabled: bool):
        self.name, self.total, self.enabled = name, total, enabled
        self.start_bytes, self.start_time, self.last_draw = done, time.monotonic(), 0.0
        self.interval, self.end = (0.25, "\r") if sys.stderr.isatty() else (30.0, "\n")

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last_draw < self.interval):
            return
        self.last_draw = now
        rate = (done - self.start_bytes) / max(now - self.start_time, 1e-3)
        line = f"{self.name}: {done / 1e6:.1f}"
        line += f"/{self.total / 1e6:.1f} MB" if self.total else " MB"
        line += f"  {rate / 1e6:.1f} MB/s"
        if self.total and rate > 0 and not final:
            minutes, seconds = divmod(int((self.total - done) / rate), 60)
            line += f"  ETA {minutes}:{seconds:02d}"
        sys.stderr.write(line.ljust(60) + ("\n" if final else self.end))
        sys.stderr.flush()


class _RedirectRecorder(urllib.request.HTTPRedirectHandler):
    """Redirect handler that keeps (url, headers) of each redirect, where the hub sends size and sha256."""

    def __init__(self):
        self.hops = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append((req.full_url, headers))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download_file(url: str, dest, progress: bool = True, timeout: float = 30.0, retries: int = 3,
                  retry_delay_s: float = 1.0) -> pathlib.Path:
    """Download `url` to `dest` through `dest`.incomplete, resuming a partial file, and verify it.

    A dropped connection is retried `retries` times with an HTTP Range request. When all tries
    fail, the partial file is kept so that the next call resumes it. The size and, where the hub
    provides it, the sha256 are checked before the fsynced file is renamed to `dest`. A file that
    fails a check is deleted, so `dest` only ever contains a verified file.
    `timeout` is in seconds and applies to connecting and to each read.
    """
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".incomplete")
    for attempt in range(retries + 1):
        try:
            expected_size, expected_sha256 = _fetch_into(url, partial, dest.name, progress, timeout)
            break
        except _ConnectionDropped as error:
            if attempt == retries:
                raise DownloadError(f"download of {url} failed after {retries + 1} tries ({error}); the "
                                    f"{partial.stat().st_size} bytes received are kept in {partial} "
                                    "and the next run resumes") from error
            time.sleep(retry_delay_s * 2**attempt)

    size = partial.stat().st_size
    if expected_size is not None and size != expected_size:
        partial.unlink()
        raise DownloadError(f"{url}: received {size} bytes but the server announced {expected_size}; "
                            "the file was deleted, run again to download it afresh")
    if expected_sha256 is not None:
        actual = _sha256_of(partial)
        if actual != expected_sha256:
            partial.unlink()
            raise DownloadError(f"{url}: sha256 {actual} does not match {expected_sha256} announced by the hub; "
                                "the file was deleted, run again to download it afresh")
    os.replace(partial, dest)
    if os.name == "posix":  # fsync the folder so the rename itself survives a crash
        folder_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
    return dest


def _fetch_into(url, partial: pathlib.Path, label: str, progress: bool, timeout: float):
    """Append the rest of `url` to `partial` and return the (size, sha256) to expect, each None if unknown."""
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity", "User-Agent": "titan"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    recorder = _RedirectRecorder()
    try:
        response = urllib.request.build_opener(recorder).open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        hops = recorder.hops + [(error.filename, error.headers)]
        expected_size, expected_sha256 = _announced_size_and_sha256(url, hops)
        if error.code == 416 and offset:  # the partial file is complete already, or longer than the file
            total = expected_size or _content_range_total(error.headers.get("Content-Range"))
            if total == offset:
                return total, expected_sha256
            partial.unlink()
            return _fetch_into(url, partial, label, progress, timeout)
        hint = "; the repo may not exist, or be private or gated" if error.code in (401, 403) else ""
        raise DownloadError(f"HTTP {error.code} {error.reason} for {url}{hint}", error.code) from error
    except (OSError, http.client.HTTPException) as error:  # URLError, refused, timeout, DNS
        raise DownloadError(f"connection to {url} failed: {getattr(error, 'reason', error)}") from error

    with response:
        hops = recorder.hops + [(response.url, response.headers)]
        expected_size, expected_sha256 = _announced_size_and_sha256(url, hops)
        if offset and response.status == 200:  # the server ignored Range and sends the whole file
            offset = 0
        elif response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                partial.unlink()
                raise DownloadError(f"{url}: requested bytes {offset}- but got range {content_range!r}; "
                                    "the partial file was deleted, run again")
        length = response.headers.get("Content-Length")
        body_size = int(length) if length and length.isdigit() else None
        meter = _Progress(label, expected_size or (offset + body_size if body_size is not None else None),
                          offset, progress)
        received = 0
        with open(partial, "ab" if offset else "wb") as file:
            try:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    received += len(chunk)
                    meter.update(offset + received)
            except (OSError, http.client.HTTPException) as error:  # reset, timeout, IncompleteRead
                message = f"connection failed after {offset + received} bytes ({error})"
                raise _ConnectionDropped(message) from error
            finally:
                file.flush()
                os.fsync(file.fileno())
        if body_size is not None and received < body_size:
            raise _ConnectionDropped(f"connection closed after {offset + received} of {offset + body_size} bytes")
        meter.update(offset + received, final=True)
    return expected_size, expected_sha256


def _announced_size_and_sha256(url: str, hops):
    """Read the file's size and sha256 from the headers of the responses along the redirect chain.

    The hub sends X-Linked-Size and X-Linked-Etag (the sha256) on its redirect to a storage host,
    whose own ETag is not a sha256 and is ignored. A file served without a redirect to another
    host carries its sha256 in the ETag if it is an LFS file. A small file's ETag is its 40-hex
    git sha1, which is skipped.
    """
    size = next((headers["X-Linked-Size"] for _, headers in hops if headers.get("X-Linked-Size")), None)
    etag = next((headers["X-Linked-Etag"] for _, headers in hops if headers.get("X-Linked-Etag")), None)
    if etag is None and urlparse(hops[-1][0]).netloc == urlparse(url).netloc:
        etag = hops[-1][1].get("ETag")
    if etag is not None:
        etag = etag.strip().removeprefix("W/").strip('"').lower()
    sha256 = etag if etag and _SHA256.fullmatch(etag) else None
    return (int(size) if size and size.strip().isdigit() else None), sha256


def _content_range_total(content_range: str | None) -> int | None:
    """Return the total of a Content-Range header such as 'bytes */1234', or None."""
    total = (content_range or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: pathlib.Path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.name} not found in {path.parent}; pass a folder with config.json and "
                              "the weights (pytorch_model.bin or model.safetensors)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from error


def _weight_map(index_path: pathlib.Path) -> dict:
    """Return the {tensor name: shard file} map of a safetensors index, rejecting shard names with a folder."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no weight_map object")
    for shard in set(weight_map.values()):
        if not isinstance(shard, str) or pathlib.Path(shard).name != shard or shard.startswith("."):
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a plain file name")
    return weight_map


def _shard_names(index_path: pathlib.Path) -> list[str]:
    return sorted(set(_weight_map(index_path).values()))


def _find_weights(folder: pathlib.Path) -> pathlib.Path | None:
    """Return the weights file in `folder`, taking a safetensors index only once all its shards are there."""
    for name in WEIGHT_FILES[:2]:
        if (folder / name).is_file():
            return folder / name
    index = folder / WEIGHT_FILES[2]
    if index.is_file() and all((folder / shard).is_file() for shard in _shard_names(index)):
        return index
    return None


# Tensor dtypes of the safetensors format, which https://github.com/huggingface/safetensors describes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format rejects larger headers


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file as tensors over a private memory map of the file.

    Pages are read on first access, so a large file costs little RAM until the tensors are
    copied into a model. Writing to a tensor never changes the file.
    """
    path = pathlib.Path(path)
    if sys.byteorder != "little":
        raise CheckpointError(f"{path}: safetensors data is little-endian, and this reader does not swap bytes")
    file_size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {file_size} bytes is too short for a safetensors file")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(f"{path}: header length {header_size} does not fit in the {file_size}-byte "
                                  "file, so it is truncated or not a safetensors file")
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: the safetensors header is invalid JSON ({error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)

    data = torch.from_file(str(path), shared=False, size=file_size, dtype=torch.uint8)[8 + header_size:]
    return {name: _tensor_from_header(path, name, entry, data) for name, entry in header.items()}


def _tensor_from_header(path: pathlib.Path, name: str, entry, data: torch.Tensor) -> torch.Tensor:
    where = f"{path}: tensor {name!r}"
    dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype") if isinstance(entry, dict) else None)
    if dtype is None:
        raise CheckpointError(f"{where} has an invalid entry or unsupported dtype: {entry!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise CheckpointError(f"{where} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
        raise CheckpointError(f"{where} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= len(data):
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] lie outside the "
                              f"{len(data)}-byte data section")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{where}: {end - begin} bytes, but shape {shape} of {entry['dtype']} "
                              f"needs {math.prod(shape) * dtype.itemsize}")
    raw = data[begin:end]
    if raw.storage_offset() % dtype.itemsize:  # view() needs aligned data; some writers do not pad the header
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def read_safetensors_sharded(index_path) -> dict[str, torch.Tensor]:
    """Read every shard that a model.safetensors.index.json lists and merge them into one dict."""
    index_path = pathlib.Path(index_path)
    weight_map = _weight_map(index_path)
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        for name, tensor in read_safetensors(index_path.parent / shard).items():
            if name in tensors:
                raise CheckpointError(f"{index_path}: tensor {name!r} appears in more than one shard")
            tensors[name] = tensor
    missing = sorted(name for name in weight_map if name not in tensors)
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} tensors in weight_map are not in their shards, "
                              f"for example {missing[:3]}")
    return tensors


def _load_torch_bin(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """Load a torch.save state dict, rejecting any pickled object that is not a tensor or container."""
    # mmap needs the zip format that torch.save writes since torch 1.6. Older files use the
    # legacy format, which torch.load can only read into RAM.
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: rejected, because it contains pickled objects other than tensors "
                              f"(torch.load weights_only=True): {error}") from error
    except RuntimeError as error:  # torch's message does not name the file
        raise CheckpointError(f"{path}: torch.load failed, so the file may be truncated or corrupt "
                              f"({error})") from error
    if not (isinstance(state_dict, dict) and all(isinstance(t, torch.Tensor) for t in state_dict.values())):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state_dict).__name__}")
    return state_dict


def _canonical_config(raw: dict, source: pathlib.Path) -> dict:
    """Map a state-spaces or transformers Mamba config to Titan's config keys, rejecting other architectures."""
    def reject(reason):
        raise CheckpointError(f"{source}: {reason}; Titan supports Mamba-1 models with tied embeddings only")

    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    try:
        if "d_model" in raw:  # state-spaces (mamba_ssm MambaConfig)
            ssm = raw.get("ssm_cfg") or {}
            if ssm.get("layer", "Mamba1") != "Mamba1":
                reject(f"ssm_cfg layer is {ssm['layer']}")
            if raw.get("d_intermediate") or raw.get("attn_layer_idx"):
                reject("the model has MLP or attention layers")
            if not raw.get("rms_norm", True):
                reject("the model uses LayerNorm instead of RMSNorm")
            tied = raw.get("tie_embeddings", True)
            config = dict(d_model=raw["d_model"], n_layer=raw["n_layer"], vocab_size=raw["vocab_size"],
                          pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
                          d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4),
                          expand=ssm.get("expand", 2), dt_rank=ssm.get("dt_rank", "auto"),
                          norm_eps=raw.get("norm_epsilon", 1e-5))
        elif "hidden_size" in raw:  # transformers MambaConfig, used by the -hf repos
            if raw.get("model_type", "mamba") != "mamba":
                reject(f"model_type is {raw['model_type']}")
            tied = raw.get("tie_word_embeddings", True)
            config = dict(d_model=raw["hidden_size"], n_layer=raw["num_hidden_layers"],
                          vocab_size=raw["vocab_size"],
                          pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
                          d_state=raw.get("state_size", 16), d_conv=raw.get("conv_kernel", 4),
                          expand=raw.get("expand", 2), dt_rank=raw.get("time_step_rank", "auto"),
                          norm_eps=raw.get("layer_norm_epsilon", 1e-5))
            d_inner = config["expand"] * config["d_model"]
            if raw.get("intermediate_size", d_inner) != d_inner:
                reject(f"intermediate_size {raw['intermediate_size']} is not expand * hidden_size = {d_inner}")
        else:
            raise CheckpointError(f"{source}: config.json has neither d_model (state-spaces layout) "
                                  "nor hidden_size (transformers layout)")
    except KeyError as error:
        raise CheckpointError(f"{source}: config.json is missing {error}") from error
    if not tied:
        reject("the config unties the output head from the embedding")
    if config["dt_rank"] == "auto":
        config["dt_rank"] = math.ceil(config["d_model"] / 16)
    return config


def backbone_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Return the name and shape of every backbone tensor that a canonical config implies."""
    d_model, d_state, dt_rank = config["d_model"], config["d_state"], config["dt_rank"]
    d_inner = config["expand"] * d_model
    shapes = {"backbone.embedding.weight": (config["vocab_size"], d_model), "backbone.norm_f.weight": (d_model,)}
    for i in range(config["n_layer"]):
        layer = f"backbone.layers.{i}."
        shapes[layer + "norm.weight"] = (d_model,)
        shapes[layer + "mixer.in_proj.weight"] = (2 * d_inner, d_model)
        shapes[layer + "mixer.conv1d.weight"] = (d_inner, 1, config["d_conv"])
        shapes[layer + "mixer.conv1d.bias"] = (d_inner,)
        shapes[layer + "mixer.x_proj.weight"] = (dt_rank + 2 * d_state, d_inner)
        shapes[layer + "mixer.dt_proj.weight"] = (d_inner, dt_rank)
        shapes[layer + "mixer.dt_proj.bias"] = (d_inner,)
        shapes[layer + "mixer.A_log"] = (d_inner, d_state)
        shapes[layer + "mixer.D"] = (d_inner,)
        shapes[layer + "mixer.out_proj.weight"] = (d_model, d_inner)
    return shapes


def read_backbone_files(folder) -> tuple[dict, dict[str, torch.Tensor], pathlib.Path | None]:
    """Read config, weights and tokenizer path from a backbone folder in either layout, in one canonical form.

    The config has d_model, n_layer, vocab_size, pad_vocab_size_multiple, d_state, d_conv, expand,
    dt_rank and norm_eps. vocab_size is the embedding's row count as stored, which is padded already,
    and tokenizer_vocab_size() gives the real vocabulary. State dict keys use the state-spaces names,
    and lm_head.weight is dropped because the model ties it to the embedding.
    """
    folder = pathlib.Path(folder)
    config = _canonical_config(_read_json(folder / "config.json"), folder / "config.json")
    weights = _find_weights(folder)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights found; expected {WEIGHT_FILES[0]}, {WEIGHT_FILES[1]}, "
                              f"or {WEIGHT_FILES[2]} with all its shards")
    if weights.name.endswith(".index.json"):
        loaded = read_safetensors_sharded(weights)
    elif weights.suffix == ".safetensors":
        loaded = read_safetensors(weights)
    else:
        loaded = _load_torch_bin(weights)

    # transformers names the embedding "embeddings". Every other backbone key is the same in both layouts.
    state_dict = {("backbone.embedding.weight" if name == "backbone.embeddings.weight" else name): tensor
                  for name, tensor in loaded.items()}
    embedding = state_dict.get("backbone.embedding.weight")
    if embedding is None:
        raise CheckpointError(f"{weights}: no backbone.embedding.weight (or backbone.embeddings.weight) tensor")
    head = state_dict.pop("lm_head.weight", None)
    if head is not None and not (head.shape == embedding.shape and torch.equal(head, embedding)):
        raise CheckpointError(f"{weights}: lm_head.weight differs from the embedding, and Titan supports "
                              "only an output head tied to the embedding")

    # state-spaces configs give the unpadded vocabulary, and transformers configs the padded one.
    multiple = config["pad_vocab_size_multiple"]
    rows = embedding.shape[0]
    if rows not in (config["vocab_size"], -(-config["vocab_size"] // multiple) * multiple):
        raise CheckpointError(f"{weights}: the embedding has {rows} rows, which does not match vocab_size "
                              f"{config['vocab_size']} in config.json padded to a multiple of {multiple}")
    config["vocab_size"] = rows
    if rows % multiple:
        config["pad_vocab_size_multiple"] = 1  # because the stored size is final and padding it would not fit
    check_state_dict(backbone_shapes(config), state_dict, f"{weights} (checked against its config.json)")
    tokenizer = folder / "tokenizer.json"
    return config, state_dict, (tokenizer if tokenizer.is_file() else None)


def tokenizer_vocab_size(tokenizer_path) -> int:
    """Return how many token ids a tokenizer.json defines (model vocabulary plus added tokens)."""
    data = _read_json(tokenizer_path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{tokenizer_path}: expected a JSON object, got {type(data).__name__}")
    vocab = data.get("model", {}).get("vocab", {})
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    ids |= {token["id"] for token in data.get("added_tokens", [])}
    return max(ids) + 1 if ids else 0


_SHAPE_HINTS = (("embedding", "are vocab_size and pad_vocab_size_multiple right?"),
                ("A_log", "is d_state right?"), ("x_proj", "are d_state and dt_rank right?"),
                ("dt_proj.weight", "is dt_rank right?"), ("conv1d.weight", "is d_conv right?"),
                ("", "are d_model and expand right?"))


def check_state_dict(expected: dict[str, tuple], got: dict[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError that lists every missing key, unexpected key and shape mismatch.

    Call it before load_state_dict(strict=True). Loading with strict=False instead would silently
    leave the missing weights at their random initial values.
    """
    missing = [name for name in expected if name not in got]
    unexpected = [name for name in got if name not in expected]
    mismatched = []
    for name, shape in expected.items():
        if name in got and tuple(got[name].shape) != tuple(shape):
            hint = next(text for key, text in _SHAPE_HINTS if key in name)
            actual = tuple(got[name].shape)
            mismatched.append(f"{name}: checkpoint has {actual}, model expects {tuple(shape)}; {hint}")
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not fit the model:"]
    sections = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    for title, items in sections:
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {item}" for item in items[:20]]
            if len(items) > 20:
                lines.append(f"    ... and {len(items) - 20} more")
    raise CheckpointError("\n".join(lines))


def load_backbone(spec, dtype=torch.float32, device="cpu", vocab_size=None, force_vocab=False, progress=True):
    """Load a frozen Mamba-1 backbone from a folder, a file inside one, or a hub repo id.

    `vocab_size` is the tokenizer's size: ids below it are real tokens, and the embedding rows
    above it are padding. A tokenizer whose size does not pad to the embedding's row count was
    not the backbone's, which is an error unless `force_vocab`. The weights are converted to
    `dtype` one tensor at a time, except A_log, D and the dt bias, which stay float32.
    Returns the model and the folder the files came from.
    """
    folder = resolve_backbone(str(spec), progress=progress)
    config, state, _ = read_backbone_files(folder)
    rows, multiple = config["vocab_size"], config["pad_vocab_size_multiple"]
    vocab_size = vocab_size or rows
    if vocab_size > rows or (-(-vocab_size // multiple) * multiple != rows and not force_vocab):
        raise CheckpointError(
            f"--backbone {spec}: its embedding has {rows} rows, which a tokenizer of {vocab_size} ids does not "
            f"pad to (multiple {multiple}); pass the tokenizer the backbone was trained with"
            + ("" if vocab_size > rows else ", or --force_tokenizer to pair them anyway"))
    cfg = MambaConfig(d_model=config["d_model"], n_layer=config["n_layer"], vocab_size=vocab_size,
                      pad_vocab_size_multiple=multiple, d_state=config["d_state"], d_conv=config["d_conv"],
                      expand=config["expand"], dt_rank=config["dt_rank"], norm_eps=config["norm_eps"])
    if cfg.padded_vocab_size != rows:          # only with force_vocab: keep the stored row count
        cfg.embedding_rows = rows

    # build on the meta device, then give each parameter its loaded tensor: the file (memory-
    # mapped) and the model are never both fully in RAM in float32
    with torch.device("meta"):
        model = MambaLM(cfg)
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, str(folder))
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in list(state):
            keep_fp32 = name.endswith(FP32_PARAM_SUFFIXES)
            params[name].data = state.pop(name).to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    model.requires_grad_(False)
    return model, folder


def resolve_relative(source, base):
    """Paths in a checkpoint may be relative to the checkpoint's folder; return a usable one."""
    p = pathlib.Path(source)
    if not p.is_absolute() and (pathlib.Path(base) / p).exists():
        return str(pathlib.Path(base) / p)
    return source


def read_checkpoint(path):
    """torch.load a Titan checkpoint safely (weights_only), with clear errors for bad files."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass the .pt file inside it (e.g. {path / 'ckpt.pt'})")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} not found; check the path")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes); use an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {str(err)[:120]}); "
                         "it is truncated, corrupt or not a Titan checkpoint; use an earlier one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a Titan checkpoint (no format {CHECKPOINT_FORMAT!r})")
    return ckpt


CHECKPOINT_FORMAT = "titan-1"


def load_titan(path, device="cpu", dtype=torch.float32):
    """Rebuild a trained Titan from its checkpoint: load the frozen backbone named inside it,
    graft fresh arms, then copy the trained weights in. Returns (model, tokenizer, checkpoint)."""
    ckpt = read_checkpoint(path)
    cfg = TitanConfig(**ckpt["config"])
    source = resolve_relative(ckpt["backbone"]["source"], pathlib.Path(path).parent)
    lm, _ = load_backbone(source, dtype=dtype, device=device, vocab_size=cfg.backbone.vocab_size,
                          force_vocab=True, progress=False)
    differ = [f"{k} (checkpoint {v}, backbone {getattr(lm.cfg, k)})"
              for k, v in dataclasses.asdict(cfg.backbone).items() if getattr(lm.cfg, k) != v]
    if differ:
        raise ValueError(f"checkpoint {path} was trained on a different backbone than {source}: "
                         + ", ".join(differ) + "; pass the backbone it was trained on")
    model = Titan(cfg, lm).to(device)
    model.load_trainable_state_dict(ckpt["trainable"], source=str(path))
    tok = get_tokenizer(resolve_relative(ckpt["tokenizer"], pathlib.Path(path).parent))
    return model.eval(), tok, ckpt


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

# GPT-2's pre-tokenizer split: contractions, letter runs, digit runs, other runs, whitespace
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """A tiktoken Encoding for ordinary text, plus Titan's three special ids after it.

    `encode` never returns a special id, whatever the text contains: a literal "<think>" or
    "<|endoftext|>" inside data is encoded as the characters it is made of. Only
    `format_example` and the prompt builder place special ids.
    """

    def __init__(self, name, encoding, n_vocab, encode=None):
        self.name = name
        self.encoding = encoding
        self._encode = encode or encoding.encode_ordinary
        self.n_vocab = n_vocab                      # the backbone's ids are [0, n_vocab)
        self.think_id, self.end_think_id, self.eot_id = n_vocab, n_vocab + 1, n_vocab + 2
        self.vocab_size = n_vocab + len(SPECIAL_TOKENS)

    def encode(self, text):
        return self._encode(text)

    def decode(self, ids):
        parts, run = [], []
        for i in ids:
            if i >= self.n_vocab:
                parts.append(self.encoding.decode(run, errors="replace"))
                parts.append(SPECIAL_TOKENS[i - self.n_vocab])
                run = []
            else:
                run.append(i)
        parts.append(self.encoding.decode(run, errors="replace"))
        return "".join(parts)

    def decode_token(self, i):
        """Return one id as readable text (raw bytes shown escaped), for reports."""
        if i >= self.n_vocab:
            return SPECIAL_TOKENS[i - self.n_vocab]
        return repr(self.encoding.decode_single_token_bytes(i))[2:-1]


def byte_tokenizer():
    """Build the demo's tokenizer: one id per byte, no merges, nothing to download."""
    encoding = tiktoken.Encoding(name="titan-bytes", pat_str=GPT2_SPLIT_PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
    return Tokenizer("bytes", encoding, 256)


def get_tokenizer(name):
    """Return a tokenizer: "bytes", "r50k_base" (GPT-2's BPE), or the path of a GPT-NeoX-20B
    tokenizer.json (the tokenizer of the state-spaces Mamba checkpoints)."""
    if name == "bytes":
        return byte_tokenizer()
    if name == "r50k_base":
        # n_vocab counts <|endoftext|> (id 50256), which encode_ordinary never produces
        encoding = tiktoken.get_encoding("r50k_base")
        return Tokenizer(name, encoding, encoding.n_vocab)
    if name.endswith(".json") and os.path.isfile(name):
        neox = load_neox_tokenizer(name)
        return Tokenizer(str(name), neox.encoding, neox.n_vocab, encode=neox.encode)
    raise ValueError(f"unknown tokenizer {name!r}; use 'bytes', 'r50k_base' or the path of a tokenizer.json")


# Code points that HF tokenizers' NFC leaves alone but Python's unicodedata does not: marks with a
# nonzero combining class and starters of canonical compositions, all assigned after Unicode 9.0.
# Measured with tokenizers 0.23.3 against unicodedata2 (Unicode 18.0), whose set covers every
# older table that Python ships. HF's tables behave like Unicode 9.0, so these act as starters.
# NOTE: a Python whose unicodedata is newer than Unicode 18.0 may need this set extended.
HF_NFC_UNKNOWN = re.compile(
    "(["
    "\u05c8-\u05c9\u07fd\u0897-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b-\u0d3c\u0eba\u1715"
    "\u1abf-\u1af0\u1df6-\u1dfa\ua82c\U000105c9\U000105d2\U000105da\U000105e4\U00010d24-\U00010d27"
    "\U00010d69-\U00010d6d\U00010eab-\U00010eac\U00010ecb-\U00010ecf\U00010ef0-\U00010efb"
    "\U00010efd-\U00010eff\U00010f46-\U00010f50\U00010f82-\U00010f85\U00011070\U0001133b"
    "\U00011382-\U00011385\U0001138b\U0001138e\U00011390-\U00011391\U000113c2\U000113c5"
    "\U000113c7-\U000113c8\U000113ce-\U000113d0\U0001145e\U00011839-\U0001183a\U00011935\U00011938"
    "\U0001193d-\U0001193e\U00011943\U000119e0\U00011a34\U00011a47\U00011a99\U00011d42"
    "\U00011d44-\U00011d45\U00011d97\U00011f41-\U00011f42\U0001611e\U00016121-\U00016129\U0001612f"
    "\U00016d63\U00016d67-\U00016d6a\U00016ff0-\U00016ff1\U0001d127-\U0001d128"
    "\U0001d250-\U0001d252\U0001d25b-\U0001d25c\U0001d25f\U0001d280-\U0001d281\U0001e08f"
    "\U0001e130-\U0001e136\U0001e2ae\U0001e2ec-\U0001e2ef\U0001e4ec-\U0001e4ef"
    "\U0001e5ee-\U0001e5ef\U0001e6e3\U0001e6e6\U0001e6ee-\U0001e6ef\U0001e6f5"
    "])"
)


def normalize_nfc_like_hf(text: str) -> str:
    """Apply NFC the way HF tokenizers does, keeping each HF_NFC_UNKNOWN code point as it is."""
    # Text that is NFC under Python's newer tables is NFC under HF's too, since HF composes and
    # reorders only a subset. The quick check skips the slow regex for nearly all text.
    if unicodedata.is_normalized("NFC", text):
        return text
    pieces = HF_NFC_UNKNOWN.split(text)  # the unknown code points land at the odd positions
    for position in range(0, len(pieces), 2):
        pieces[position] = unicodedata.normalize("NFC", pieces[position])
    return "".join(pieces)


def byte_level_alphabet() -> dict[str, int]:
    """Map each character of GPT-2's byte-level alphabet to the byte it stands for.

    Printable Latin-1 bytes stand for themselves. The other 68 bytes (controls, space, 0xAD)
    move, in byte order, to code points 256 and up, so every vocabulary entry is visible text.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return alphabet


class NeoXTokenizer:
    """GPT-NeoX-20B byte-level BPE that returns the same ids as HF `tokenizers` on ordinary text.

    Special-token text inside data (a literal "<|endoftext|>") is encoded as ordinary text and
    never becomes a special id, where HF would match it. Callers that need a special token put
    its id from `special_ids` in place themselves.
    """

    def __init__(self, encoding: tiktoken.Encoding, space_run_ids: dict[str, int],
                 special_ids: dict[str, int]):
        self.encoding = encoding  # call `encode` below, because tiktoken's skips NFC and space runs
        self.space_run_ids = space_run_ids
        self.special_ids = special_ids
        self.eot_id = special_ids["<|endoftext|>"]
        self.n_vocab = encoding.n_vocab  # max id + 1
        longest = max(len(run) for run in space_run_ids)
        # A greedy scan takes the longest run first at the leftmost position, just as HF's
        # leftmost-longest added-token matcher does, and leaves a single space to the BPE.
        self._space_run_pattern = re.compile(f"( {{2,{longest}}})")

    def encode(self, text: str) -> list[int]:
        """Encode text to ids: NFC, then added space runs, then GPT-2 split and BPE in between.

        A lone surrogate becomes U+FFFD (tiktoken's handling), where HF raises TypeError.
        """
        text = normalize_nfc_like_hf(text)  # the file's normalizer
        ids = []
        # re.split with one capture group puts the space runs at the odd positions.
        for position, piece in enumerate(self._space_run_pattern.split(text)):
            if position % 2 == 1:
                ids.append(self.space_run_ids[piece])
            elif piece:
                ids.extend(self.encoding.encode_ordinary(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Decode ids to text, special ids to their literal text; broken UTF-8 becomes U+FFFD."""
        return self.encoding.decode(ids)


def load_neox_tokenizer(path: str) -> NeoXTokenizer:
    """Build a NeoXTokenizer from a HuggingFace tokenizer.json of the GPT-NeoX-20B kind.

    Raises ValueError when the file uses a feature this reader does not reproduce.
    """
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    model = config["model"]
    if model["type"] != "BPE" or (config["normalizer"] or {}).get("type") != "NFC":
        raise ValueError(f"{path}: expected a BPE model with an NFC normalizer, as GPT-NeoX-20B has")

    # tiktoken merges the adjacent pair whose joined bytes have the lowest rank, while HF applies
    # the merge rule with the lowest index. In the GPT-NeoX-20B file, merge k creates token id
    # 245 + k, so id order is merge order and the ids can serve as ranks with no remapping.
    # NOTE: the two rules also agree on every vocabulary entry of this file (checked offline
    # against tokenizers 0.23.3), but this function checks only the id order for other files.
    vocab = model["vocab"]
    previous_id = -1
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged_id = vocab[left + right]
        if merged_id <= previous_id:
            raise ValueError(f"{path}: merge {merge!r} creates id {merged_id}, below an earlier merge's "
                             f"id {previous_id}, so token ids are not merge ranks and need remapping")
        previous_id = merged_id

    # The special tokens also sit in the model vocabulary, but no merge creates them, so they
    # stay out of the BPE ranks. The 13 bytes that never occur in UTF-8 are missing from the
    # vocabulary, which is harmless because encode only receives valid UTF-8.
    added = config["added_tokens"]
    special_ids = {token["content"]: token["id"] for token in added if token["special"]}
    space_run_ids = {token["content"]: token["id"] for token in added if not token["special"]}
    longest = max((len(run) for run in space_run_ids), default=0)
    if longest < 2 or sorted(space_run_ids) != [" " * n for n in range(2, longest + 1)]:
        raise ValueError(f"{path}: non-special added tokens {sorted(space_run_ids)!r} are not "
                         "exactly the runs of 2 or more spaces that NeoXTokenizer matches")
    if "<|endoftext|>" not in special_ids:
        raise ValueError(f"{path}: no special token <|endoftext|>, found {sorted(special_ids)!r}")

    alphabet = byte_level_alphabet()
    ranks = {bytes(alphabet[char] for char in token): token_id
             for token, token_id in vocab.items() if token not in special_ids}
    # The space runs are in tiktoken's special_tokens only so that decode can map them to text.
    encoding = tiktoken.Encoding("gpt-neox-20b", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={**special_ids, **space_run_ids})
    return NeoXTokenizer(encoding, space_run_ids, special_ids)


# ---------------------------------------------------------------------------------------------
# Reasoning data
# ---------------------------------------------------------------------------------------------

PROMPT_TEMPLATE = "User: {question}\nAssistant: "


def arithmetic_fact(rng, max_value):
    """Draw one single-step fact such as "12+7=19", with every number in [0, max_value)."""
    a = rng.randrange(max_value)
    if rng.random() < 0.5:
        b = rng.randrange(max_value - a)
        return f"{a}+{b}={a + b}"
    b = rng.randrange(a + 1)
    return f"{a}-{b}={a - b}"


def arithmetic_problem(rng, n_steps, max_value, max_operand=10):
    """Draw a chain of n_steps additions and subtractions of operands below max_operand, whose
    partial results stay in [0, max_value). Returns {question, reasoning, answer, n_steps}; the
    reasoning has one line per step, each a fact the demo backbone was pretrained on."""
    value = rng.randrange(1, max_operand)
    question, lines = str(value), []
    for _ in range(n_steps):
        if rng.random() < 0.5 and value < max_value - 1:
            b = rng.randrange(1, min(max_operand, max_value - value))
            lines.append(f"{value}+{b}={value + b}")
            question += f"+{b}"
            value += b
        else:
            b = rng.randrange(0, min(max_operand, value + 1))
            lines.append(f"{value}-{b}={value - b}")
            question += f"-{b}"
            value -= b
    return {"question": question, "reasoning": "\n".join(lines), "answer": str(value), "n_steps": n_steps}


def parse_record(obj):
    """Turn one JSON object into {question, reasoning, answer}; None if it has no usable shape.

    Accepted shapes: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]},
    {"prompt", "response"} where the response contains <think>...</think>, and
    {"question", "reasoning", "answer"}.
    """
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        user = [m.get("content", "") for m in obj["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        bot = [m.get("content", "") for m in obj["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
        if not user or not bot:
            return None
        return _nonempty(split_thinking(user[0], bot[-1]))
    if "prompt" in obj and "response" in obj:
        return _nonempty(split_thinking(obj["prompt"], obj["response"]))
    if "question" in obj and "answer" in obj:
        if not all(isinstance(obj.get(k, ""), str) for k in ("question", "reasoning", "answer")):
            return None                 # null, numbers or lists would train as their Python spelling
        return _nonempty({"question": obj["question"], "reasoning": obj.get("reasoning", ""),
                          "answer": obj["answer"]})
    return None


def _nonempty(rec):
    """Return rec, or None if its question or answer is blank (nothing to condition on or learn)."""
    if rec is None or not rec["question"].strip() or not rec["answer"].strip():
        return None
    return rec


def split_thinking(question, response):
    """Split "<think>reasoning</think>answer" into its parts; None if <think> is never closed.

    A response that closes </think> without opening it (chat templates often put the opening
    tag in the prompt) counts everything before </think> as reasoning.
    """
    if not isinstance(question, str) or not isinstance(response, str):
        return None
    if "</think>" in response:
        reasoning, answer = response.split("</think>", 1)
        reasoning = reasoning.split("<think>", 1)[-1]
        return {"question": question, "reasoning": reasoning.strip(), "answer": answer.strip()}
    if "<think>" in response:
        return None
    return {"question": question, "reasoning": "", "answer": response.strip()}


def read_jsonl(path, max_bad_fraction=0.5, log=print):
    """Read chain-of-thought records from a JSONL file.

    Invalid lines are skipped and reported with their line numbers. The read fails with a
    ValueError when the file has no valid record, or when more than `max_bad_fraction` of its
    non-blank lines are invalid.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"--data {path} is a folder; pass a .jsonl file")
    if not path.is_file():
        raise ValueError(f"--data {path} not found; pass a .jsonl file with one JSON object per line")
    records, bad, total = [], [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")     # UTF-8 byte-order mark
            if not raw.strip():
                continue
            total += 1
            try:
                if b"\x00" in raw:
                    raise ValueError("NUL byte")
                obj = json.loads(raw.decode("utf-8"))
                rec = parse_record(obj)
                if rec is None:
                    raise ValueError("<think> never closed" if "<think>" in str(obj)
                                     else "no non-empty text question/answer")
            except RecursionError:
                bad.append((lineno, "JSON nested too deeply"))
                continue
            except (UnicodeDecodeError, ValueError) as err:
                bad.append((lineno, str(err).splitlines()[0][:80]))
                continue
            records.append(rec)
    if bad:
        shown = ", ".join(f"line {n} ({why})" for n, why in bad[:5])
        log(f"warning: {path}: skipped {len(bad)} of {total} lines: {shown}" + (" ..." if len(bad) > 5 else ""))
    if not records:
        raise ValueError(f"--data {path}: no valid record in {total} non-blank lines; each line must be a JSON "
                         "object with messages, prompt/response or question/reasoning/answer")
    if len(bad) > max_bad_fraction * total:
        raise ValueError(f"--data {path}: {len(bad)} of {total} lines are invalid (more than "
                         f"{max_bad_fraction:.0%}); fix the file or check its format")
    return records


def format_example(tok: Tokenizer, rec, seq_len=None, stats=None):
    """Build the training sequence of one record and its loss mask.

    The sequence is PROMPT_TEMPLATE, then <think> "\\n{reasoning}\\n" </think> "\\n{answer}" <|end|>.
    Returns (ids, mask) as lists; mask[i] is True where ids[i] is a supervised target, which
    is everything from <think> on. A sequence longer than seq_len + 1 loses the end of its
    reasoning, never its answer, and the number of tokens cut is added to stats["cut_tokens"].
    Returns None if the prompt and answer alone do not fit.
    """
    prompt = tok.encode(PROMPT_TEMPLATE.format(question=rec["question"]))
    reasoning = tok.encode("\n" + rec["reasoning"] + "\n")
    ending = [tok.end_think_id] + tok.encode("\n" + rec["answer"]) + [tok.eot_id]
    if seq_len is not None:
        room = seq_len + 1 - len(prompt) - 1 - len(ending)
        if room < 0:
            return None
        if len(reasoning) > room:
            if stats is not None:
                stats["cut_tokens"] = stats.get("cut_tokens", 0) + len(reasoning) - room
            reasoning = reasoning[:room]
    completion = [tok.think_id] + reasoning + ending
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def make_batch(examples, pad_id):
    """Stack (ids, mask) pairs into inputs (b, l) and targets (b, l), -100 where unsupervised."""
    length = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), length), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        ids_t = torch.tensor(ids)
        x[row, :len(ids) - 1] = ids_t[:-1]
        target = ids_t[1:].clone()
        target[~torch.tensor(mask[1:])] = -100
        y[row, :len(ids) - 1] = target
    return x, y


def extract_answer(text):
    """Return the answer part of a generation: the text after </think>, without <|end|>."""
    if "</think>" not in text:
        return None
    return text.split("</think>", 1)[1].split("<|end|>", 1)[0].strip()


def grade(prediction, reference):
    """Exact match after whitespace normalisation; numbers compare as numbers."""
    if prediction is None:
        return False
    norm = lambda s: " ".join(str(s).split())
    p, r = norm(prediction), norm(reference)
    try:
        return float(p) == float(r)
    except ValueError:
        return p == r


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def cat_caches(caches):
    """Join per-sequence caches (batch 1 each) into one cache along the batch dimension."""
    def cat_states(states):
        return [(torch.cat([s[i][0] for s in states]), torch.cat([s[i][1] for s in states]))
                for i in range(len(states[0]))]
    return {"layers": cat_states([c["layers"] for c in caches]),
            "arms": cat_states([c["arms"] for c in caches])}


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Pick the next id per row of logits (b, v): greedy at temperature 0, else sampled after
    top-k and nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p      # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def find_loop(ids, max_period=8, min_repeats=4):
    """Return (period, start) if `ids` ends in a block of 1..max_period tokens repeated at least
    min_repeats times, else None. `start` is the index where the repetition begins."""
    for period in range(1, max_period + 1):
        if len(ids) < period * min_repeats:
            break
        tail = ids[-period:]
        if all(ids[-period * (r + 1):len(ids) - period * r] == tail for r in range(1, min_repeats)):
            start = len(ids) - period * min_repeats
            while start - period >= 0 and ids[start - period:start] == tail:
                start -= period
            return period, start
    return None


@torch.no_grad()
def generate_stream(model: Titan, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
                    repetition_penalty=1.0, moe_scale=None, use_blackboard=None, probe=False,
                    generator=None):
    """Yield (next_ids (b,), probe dict or None) once per new token, for a batch of prompts.

    Each prompt is processed once, alone, so prompts of different lengths need no padding.
    Then all sequences advance together, one token per step through the recurrent cache, and
    the cost per token does not grow with the position. The caller decides when to stop.
    """
    caches, last = [], []
    for p in prompts:
        logits, _, cache = model(torch.tensor([p], device=model.special.device),
                                 moe_scale=moe_scale, use_blackboard=use_blackboard)
        caches.append(cache)
        last.append(logits[:, -1])
    cache, logits = cat_caches(caches), torch.cat(last)                       # logits: (b, v)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for _ in range(max_new_tokens):
        if repetition_penalty != 1.0:
            penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        seen[torch.arange(len(next_ids)), next_ids] = True
        record = {} if probe else None
        logits, _, cache = model(next_ids[:, None], cache=cache, moe_scale=moe_scale,
                                 use_blackboard=use_blackboard, probe=record)
        logits = logits[:, -1]
        if probe:
            record["cache"] = cache
        yield next_ids, record


def generate(model, tok: Tokenizer, prompts, max_new_tokens, **kwargs):
    """Generate for a batch of prompt id lists; each sequence stops after <|end|>.
    Returns the new ids of each sequence, <|end|> included when it was emitted."""
    outs = [[] for _ in prompts]
    done = [False] * len(prompts)
    for next_ids, _ in generate_stream(model, prompts, max_new_tokens, **kwargs):
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:
                outs[i].append(t)
                done[i] = t == tok.eot_id
        if all(done):
            break
    return outs


def question_prompt(tok: Tokenizer, question):
    """Encode `question` in the training template; the model continues with <think>."""
    return tok.encode(PROMPT_TEMPLATE.format(question=question))


def evaluate(model, tok, problems, max_new_tokens=64, batch_size=32, **kwargs):
    """Greedy exact-answer accuracy on records with question and answer. Returns
    (accuracy, list of (record, generated text))."""
    results = []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        outs = generate(model, tok, [question_prompt(tok, r["question"]) for r in chunk], max_new_tokens, **kwargs)
        results += [(r, tok.decode(o)) for r, o in zip(chunk, outs)]
    correct = sum(grade(extract_answer(text), r["answer"]) for r, text in results)
    return correct / max(1, len(results)), results


# ---------------------------------------------------------------------------------------------
# Memory plan for one SFT step
# ---------------------------------------------------------------------------------------------

# (d_model, n_layer) of the published Mamba-1 checkpoints, for planning without a download
KNOWN_BACKBONES = {
    "state-spaces/mamba-130m": (768, 24), "state-spaces/mamba-370m": (1024, 48),
    "state-spaces/mamba-790m": (1536, 48), "state-spaces/mamba-1.4b": (2048, 48),
    "state-spaces/mamba-2.8b": (2560, 64),
}


def sft_memory_plan(cfg: TitanConfig, batch_size, seq_len, frozen_dtype=torch.bfloat16, chunk=64):
    """Estimate the peak memory of one SFT step, in bytes, by part.

    The parameter counts are exact, because the model is built on the meta device. The
    activation terms count the tensors that autograd keeps alive at the peak, in the backward
    pass of the first checkpointed layer. They are the arms' saved tensors, the residual stream
    saved at every checkpointed layer, one recomputed layer, and one chunk of logits with
    their gradient.
    NOTE: the activation terms are an estimate. bench.py --memory measured one 1.4B-shape
    fp32 step at seq_len 2048 at 8.60 GiB against a plan of 7.87 GiB (8% low) on a CPU;
    allocator caching on a GPU adds to that.
    """
    with torch.device("meta"):
        model = Titan(cfg, MambaLM(cfg.backbone))
    fb = torch.finfo(frozen_dtype).bits // 8
    frozen = sum(p.numel() * (4 if name.endswith(FP32_PARAM_SUFFIXES) else fb)
                 for name, p in model.lm.named_parameters())
    n_train = sum(p.numel() for p in model.trainable_parameters())

    bb = cfg.backbone
    tokens = batch_size * seq_len
    upper = bb.n_layer - cfg.inject_layer

    def mamba_activations(d_model, d_inner, d_state, linear_bytes):
        # in_proj, conv and SiLU outputs in the compute dtype; Δ, the scan's inputs and output,
        # the skip and the gate in float32; plus the scan's per-chunk state buffers
        per_token = d_model * (4 + linear_bytes) + d_inner * (3 * 2 * linear_bytes + 9 * 4)
        return tokens * per_token + 5 * batch_size * min(chunk, seq_len) * d_inner * d_state * 4

    arms = cfg.n_arms * mamba_activations(cfg.d_bridge, 2 * cfg.d_bridge, cfg.arm_d_state, fb)
    arms += tokens * cfg.n_arms * cfg.d_bridge * 4 * 4         # stacked outputs, read-back, mixing
    residual = tokens * bb.d_model * 4 * (upper + 2)
    recompute = mamba_activations(bb.d_model, bb.d_inner, bb.d_state, fb)
    vocab = model.vocab_size
    # one chunk of cross_entropy_sum: logits, their float32 copy, log-softmax and gradient
    logits = min(tokens, CE_CHUNK_LOGITS // vocab) * vocab * (fb + 3 * 4)
    return {"frozen weights": frozen, "trainable weights": n_train * 4, "gradients": n_train * 4,
            "optimizer state": n_train * 8, "activations": arms + residual + recompute + logits}
