#!/usr/bin/env python3
"""A Hugging Face Llama model with unibuf's RMSNorm and sampler spliced in, against stock.

A real client of unibuf's Python bindings: every ``LlamaRMSNorm`` of a transformers (5.x)
Llama-architecture model (each layer's input and post-attention norms, and the final norm) is
replaced by a module that calls ``unibuf.ops.rms_norm`` on the hidden state through
``unibuf.torch.wrap`` / ``as_tensor`` (DLPack both ways, no copy: the norm weights are wrapped
once at replacement, the hidden state is viewed as ``[rows, hidden]``, the output viewed back),
and the greedy next-token choice is ``unibuf.ops.sample(q, logits_row, temperature=0.0)`` on
the last position's logits, whose uint32 token buffer becomes the next ``input_ids`` through
``as_tensor`` (no host round trip inside the loop).

One manual decode loop with the KV cache (``model(input_ids, past_key_values=...,
use_cache=True)``; the keyword is ``cache`` in transformers releases that renamed it) runs both
configurations: stock (HF's norms, ``torch.argmax``) and unibuf.
Reported: max |logit difference| and the relative difference (max |diff| / max |stock logit|)
for the prompt's prefill logits (every position) and for each decode step; whether the greedy
sequences are identical; unibuf's copy audit for the unibuf run; decode tokens/s of both.
Exits non-zero when an assertion fails:

- logits: relative difference <= the dtype's tolerance (see ``TOLERANCE``) at prefill and at
  every decode step whose context is the same in both runs;
- greedy tokens identical, and at least ``--min-identical`` (32) of them;
- copy audit: 0 bytes in every direction but "shared" (zero-byte DLPack hand-overs).

In float16 / bfloat16 the greedy sequences can legitimately part at a near-tie (stock's top-2
margin below the logit difference; the script prints it): the token check then fails as
asked. ``--f32-reference`` shows which of the two runs still follows a float32 run.

    # random weights of SmolLM2-135M's shape (no download)
    python3 bench/peers/hf_llama_unibuf.py --random-config smollm2 --dtype float32 --device cuda
    # real weights from a GGUF file (needs `pip install gguf`)
    python3 bench/peers/hf_llama_unibuf.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dtype bfloat16 --device cuda --tokens 32 --json /tmp/hf_llama_unibuf.json

unibuf's bindings must be built with the backend of ``--device``
(``maturin develop --release --features cuda`` in bindings/python for CUDA).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn as nn

import unibuf
import unibuf.ops
import unibuf.torch as ut

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Unit roundoff u = 2^-p of each storage dtype (p significant bits, round to nearest).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}

# The asserted bound on max|logit diff| / max|stock logit|, per dtype.
#
# float32: 1e-4. Both norms compute in f32; they differ only in summation order (HF: torch's
# mean; unibuf: f64 sums on the CPU, a tree on the GPU) and where the weight multiply is
# rounded, i.e. a few ulps (u = 6e-8) per element per norm. 1e-4 leaves three orders of
# magnitude over that for 61 norms and 30 layers of propagation.
#
# bfloat16 / float16: 16u (bf16: 16 * 2^-8 = 6.25e-2; f16: 16 * 2^-11 = 7.8e-3). HF's
# LlamaRMSNorm rounds twice: the normalised activations x * rsqrt(mean(x^2) + eps) are rounded
# to the storage dtype *before* the weight multiply, whose product is rounded again, while
# unibuf computes x * r * w in f32 and rounds once. The two outputs of one norm therefore
# differ by up to ~2u relative per element (typically 1 ulp in a fraction of the elements),
# at each of the 61 norms; from the first norm on, the two runs are two evaluations of the
# network with different rounding, and their difference grows like the model's own
# low-precision rounding noise. Logits are dot products of 576+ such activations with the
# embedding rows; a handful of ulps at the logit scale covers the propagated difference.
# Measured (CPU, SmolLM2-135M Q4_1 GGUF, 32 steps): bf16 1.6e-2 .. 2.8e-2 (4-7u), f16
# 2.5e-3 .. 4.1e-3 (5-8u); each run's own distance from a float32 run of the same weights
# (--f32-reference) is of the same size (bf16 ~1.5e-2..2.4e-2, f16 ~2.7e-3), i.e. the
# difference is the dtype's rounding noise, not an error of either norm.
TOLERANCE = {
    "float32": 1e-4,
    "bfloat16": 16 * UNIT_ROUNDOFF["bfloat16"],
    "float16": 16 * UNIT_ROUNDOFF["float16"],
}
TOLERANCE_REASON = {
    "float32": "f32: both compute in f32; summation order / rounding place only (u=6e-8); 1e-4 relative",
    "bfloat16": "bf16: 16u = 6.25e-2 relative; HF rounds the normalised activations to bf16 before "
    "the weight multiply (two roundings), unibuf rounds x*r*w once: up to ~2u per element "
    "per norm, at 61 norms, propagated like bf16 rounding noise",
    "float16": "f16: 16u = 7.8e-3 relative; HF rounds the normalised activations to f16 before "
    "the weight multiply (two roundings), unibuf rounds x*r*w once: up to ~2u per element "
    "per norm, at 61 norms, propagated like f16 rounding noise",
}

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json).
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)

# The fixed prompt of the random-weight run (token ids < 49152).
RANDOM_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411]

DEFAULT_PROMPT = "The three most important ideas in physics are"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class UnibufRMSNorm(nn.Module):
    """``LlamaRMSNorm`` through ``unibuf.ops.rms_norm``, zero-copy both ways.

    The weight is wrapped once, here (it must not be moved or re-allocated afterwards); each
    call views the hidden state as ``[rows, hidden]`` (a view of contiguous memory, never a
    copy), wraps it, queues the op on ``queue`` and views the output buffer back as a tensor
    of the input's shape.
    """

    calls = 0  # every forward of every instance (a check that the splice is live)

    def __init__(self, src: nn.Module, device: unibuf.Device, queue: unibuf.Queue, name: str):
        super().__init__()
        w = src.weight.detach()
        if not w.is_contiguous():
            raise ValueError(f"{name}: the norm weight is not contiguous")
        self.weight = src.weight  # the same Parameter: the module still owns it
        self.eps = float(src.variance_epsilon)
        self.hidden = int(w.shape[-1])
        self.queue = queue
        self.udev = device
        self.name = name
        self._w = ut.wrap(w, device, read_only=True, label=f"norm_w:{name}")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not hidden_states.is_contiguous():
            # A .contiguous() here would be a copy: refuse instead, so the claim stays true.
            raise RuntimeError(f"{self.name}: hidden state is not contiguous ({hidden_states.stride()})")
        if hidden_states.dtype != self.weight.dtype:
            raise RuntimeError(
                f"{self.name}: hidden state {hidden_states.dtype} vs weight {self.weight.dtype} "
                "(unibuf's rms_norm takes one dtype)"
            )
        x2 = hidden_states.view(-1, self.hidden)
        y = unibuf.ops.rms_norm(self.queue, ut.wrap(x2, self.udev), self._w, self.eps)
        UnibufRMSNorm.calls += 1
        return ut.as_tensor(y).view(hidden_states.shape)

    def extra_repr(self):
        return f"{self.hidden}, eps={self.eps}, unibuf"


class NormSplice:
    """Swaps every LlamaRMSNorm of a model for a UnibufRMSNorm and back."""

    def __init__(self, model: nn.Module, device: unibuf.Device, queue: unibuf.Queue):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.slots = []  # (parent, attribute, stock module, unibuf module)
        for name, mod in list(model.named_modules()):
            for attr, child in list(mod.named_children()):
                if isinstance(child, LlamaRMSNorm):
                    full = f"{name}.{attr}" if name else attr
                    self.slots.append((mod, attr, child, UnibufRMSNorm(child, device, queue, full)))
        if not self.slots:
            raise RuntimeError("no LlamaRMSNorm in the model: not a Llama-architecture model?")

    def use(self, unibuf_on: bool) -> None:
        for parent, attr, stock, ub in self.slots:
            setattr(parent, attr, ub if unibuf_on else stock)

    def names(self):
        return [u.name for _, _, _, u in self.slots]


def pick_stock(logits: torch.Tensor) -> torch.Tensor:
    """Greedy next token, PyTorch: argmax of the last position (ties to the first index)."""
    return logits[:, -1, :].argmax(dim=-1, keepdim=True)


def make_pick_unibuf(device: unibuf.Device, queue: unibuf.Queue):
    """Greedy next token, unibuf: ``ops.sample(temperature=0)`` of the last position's logits
    (ties to the lower id, as torch.argmax), the uint32 token viewed as int32 (same bits, a
    free view) and handed back to PyTorch as the next input_ids [1, 1] without a copy."""
    counter = {"calls": 0}

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != 1:
            raise ValueError("batch 1 only")
        row = logits[0, -1]  # [vocab], contiguous (a view at an offset)
        tok = unibuf.ops.sample(queue, ut.wrap(row, device, read_only=True, label="logits"), temperature=0.0)
        counter["calls"] += 1
        return ut.as_tensor(tok.cast("int32")).view(1, 1)

    return pick, counter


def _cache_keyword() -> str:
    """``past_key_values``, or ``cache`` where transformers has renamed it (5.25 deprecates the
    old name, with a warning per call, and removes it in 5.40): the same KV cache either way."""
    import inspect

    from transformers import LlamaForCausalLM

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


CACHE_KW = _cache_keyword()


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


@torch.inference_mode()
def decode(model, prompt_ids: torch.Tensor, steps: int, pick, record: bool):
    """Prefill, then ``steps`` decode forwards with the KV cache; greedy throughout.

    Returns (tokens [steps + 1] on the host, prefill logits [seq, vocab] f32 or None, the
    decode steps' last-position logits [steps, vocab] f32 or None, decode-loop seconds).
    Nothing leaves the device inside the decode loop; on CUDA the loop is timed between two
    device synchronisations.
    """
    out = model(prompt_ids, **{CACHE_KW: None}, use_cache=True)
    prefill = out.logits[0].float().clone() if record else None
    cur = pick(out.logits)
    past = _cache_of(out)
    toks = [cur]
    steps_logits = []
    cuda = prompt_ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(cur, **{CACHE_KW: past}, use_cache=True)
        past = _cache_of(out)
        if record:
            steps_logits.append(out.logits[0, -1].float().clone())
        cur = pick(out.logits)
        toks.append(cur)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = [int(t) for t in torch.cat([t.reshape(-1).long() for t in toks]).tolist()]
    return tokens, prefill, (torch.stack(steps_logits) if record else None), seconds


def diff(a: torch.Tensor, b: torch.Tensor):
    """(max |a - b|, max |a - b| / max |a|) in f32."""
    d = (a.float() - b.float()).abs().max().item()
    scale = a.float().abs().max().item()
    return d, (d / scale if scale > 0 else (0.0 if d == 0 else math.inf))


def _gguf_kwargs():
    """Dequantise GGUF weights into plain ``nn.Linear`` layers where transformers could keep
    them packed (its ``GgufConfig(dequantize=...)``, with hub kernels and a ggml attention): the
    comparison is of the norms, in an otherwise stock Llama."""
    try:
        import inspect

        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            return {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        pass
    return {}


def _cast_parameters(model, dtype):
    """Parameters to ``dtype``, buffers (RoPE's ``inv_freq``) left in float32, as
    ``from_pretrained(dtype=...)`` leaves them (``model.to(dtype)`` would round the RoPE
    frequencies too). Tied parameters stay tied (the same Parameter objects)."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def load_model(args, dtype, device, f32_reference: bool):
    """(model, f32 reference model or None, tokenizer or None, prompt ids [1, seq], description).

    GGUF: ``from_pretrained(dtype=...)`` (and once more in float32 for the reference). Random
    weights: built in float32 from the seed, parameters cast to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.gguf:
        path = os.path.abspath(args.gguf)
        d, name = os.path.dirname(path), os.path.basename(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        kw = _gguf_kwargs()
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype, **kw)
        ref = None
        if f32_reference and dtype != torch.float32:
            ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, **kw)
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
        ids = tok(prompt, return_tensors="pt").input_ids
        desc = f"{name} (GGUF, dequantised to {args.dtype})"
    else:
        if args.prompt is not None:
            raise SystemExit("--prompt needs a tokenizer: use it with --gguf")
        torch.manual_seed(args.seed)
        cfg = LlamaConfig(**SMOLLM2)
        model = LlamaForCausalLM(cfg)
        # HF initialises norm weights to ones, which would leave the weight multiply untested:
        # seeded weights around one instead.
        g = torch.Generator().manual_seed(args.seed + 1)
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LlamaRMSNorm):
                    m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
        ref = None
        if f32_reference and dtype != torch.float32:
            import copy

            ref = copy.deepcopy(model)
        model = _cast_parameters(model, dtype)
        tok = None
        ids = torch.tensor([RANDOM_PROMPT], dtype=torch.long)
        desc = f"random {args.random_config} shape (seed {args.seed}, {args.dtype})"
    model = model.to(device).eval().requires_grad_(False)
    if ref is not None:
        ref = ref.to(device).eval().requires_grad_(False)
    if getattr(model.config, "model_type", None) != "llama":
        print(f"note: model_type is {model.config.model_type!r}; splicing its LlamaRMSNorm modules")
    return model, ref, tok, ids.to(device), desc


def copy_audit(dev: unibuf.Device):
    rep = dev.copy_report()
    dirs = {k: {"count": int(v["count"]), "bytes": int(v["bytes"])} for k, v in rep.directions.items()}
    for k in ("host->device", "device->host", "device->device", "fill", "shared"):
        dirs.setdefault(k, {"count": 0, "bytes": 0})
    return rep, dirs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", metavar="PATH", help="a GGUF file of a Llama-architecture model")
    src.add_argument("--random-config", choices=["smollm2"], help="random weights of this shape")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps after the prefill")
    ap.add_argument("--prompt", default=None, help=f"text prompt (with --gguf; default {DEFAULT_PROMPT!r})")
    ap.add_argument("--json", metavar="PATH", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=4, help="decode steps of each warm-up run")
    ap.add_argument("--min-identical", type=int, default=32,
                    help="assert at least this many greedy tokens, identical (default 32)")
    ap.add_argument("--f32-reference", action="store_true",
                    help="with a 16-bit --dtype: also run the stock model in float32 (a second "
                    "copy of the weights) and report each run's distance from it; informative, "
                    "asserts nothing")
    args = ap.parse_args()

    dtype = DTYPES[args.dtype]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: PyTorch sees no CUDA device")
        if "cuda" not in unibuf.FEATURES:
            raise SystemExit("--device cuda: this unibuf build has no CUDA backend "
                             "(maturin develop --release --features cuda)")
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()

    model, ref_model, tok, ids, desc = load_model(args, dtype, device, args.f32_reference)
    n_layers = model.config.num_hidden_layers

    # unibuf: the device sharing PyTorch's (the primary context on CUDA), one queue.
    udev = ut.device_for(device)
    q = udev.queue("hf-llama")
    splice = NormSplice(model, udev, q)
    pick_unibuf, sample_counter = make_pick_unibuf(udev, q)
    print(f"model: {desc}; {n_layers} layers, {len(splice.slots)} RMSNorms spliced; "
          f"prompt {ids.shape[1]} tokens; {args.tokens} decode steps")
    print(f"device: {device_name} (torch {torch.__version__}, unibuf {unibuf.__version__} "
          f"on {udev.backend}: {udev.name})")

    runs = {}
    for label, on, pick in (("stock", False, pick_stock), ("unibuf", True, pick_unibuf)):
        splice.use(on)
        if on:
            # The audit covers everything unibuf did from here on: warm-up, both passes.
            udev.clear_copy_ledger()
            UnibufRMSNorm.calls = 0
            sample_counter["calls"] = 0
        decode(model, ids, args.warmup, pick, record=False)  # warm-up (kernels, allocator)
        tokens, prefill, steps_logits, _ = decode(model, ids, args.tokens, pick, record=True)
        tokens_t, _, _, secs = decode(model, ids, args.tokens, pick, record=False)  # timed
        if tokens_t != tokens:
            print(f"warning: {label}: the timed pass generated other tokens than the recorded one")
        runs[label] = dict(tokens=tokens, prefill=prefill, steps=steps_logits, seconds=secs,
                           tok_s=args.tokens / secs if secs > 0 else math.inf)
    splice.use(False)
    ref = None
    if ref_model is not None:
        r_tokens, r_prefill, r_steps, _ = decode(ref_model, ids, args.tokens, pick_stock, record=True)
        ref = dict(tokens=r_tokens, prefill=r_prefill, steps=r_steps)
        del ref_model
    if args.device == "cuda":
        torch.cuda.synchronize()
    udev.drain()
    rep, audit = copy_audit(udev)

    # Norm calls expected: (2 per layer + 1) per forward; forwards = 3 passes of (1 + steps).
    forwards = (1 + args.warmup) + 2 * (1 + args.tokens)
    norm_calls_expected = forwards * (2 * n_layers + 1)
    samples_expected = forwards

    # Logits.
    tol = TOLERANCE[args.dtype]
    s, u = runs["stock"], runs["unibuf"]
    pre_max, pre_rel = diff(s["prefill"], u["prefill"])
    same_prefix = 0  # leading generated tokens equal in both runs
    for a, b in zip(s["tokens"], u["tokens"]):
        if a != b:
            break
        same_prefix += 1
    identical = s["tokens"] == u["tokens"]
    # Decode step i (1-based) is fed token i-1: its logits compare like for like only while
    # tokens 0..i-1 agree.
    comparable = min(args.tokens, same_prefix)
    step_rows = []
    for i in range(args.tokens):
        m, r = diff(s["steps"][i], u["steps"][i])
        step_rows.append({"step": i + 1, "max_abs": m, "rel": r, "same_context": i < comparable})
    cmp_steps = [r for r in step_rows if r["same_context"]]
    dec_max = max((r["max_abs"] for r in cmp_steps), default=0.0)
    dec_rel = max((r["rel"] for r in cmp_steps), default=0.0)

    print()
    print(f"prefill logits ({ids.shape[1]} positions x {s['prefill'].shape[1]}): "
          f"max |diff| {pre_max:.3e}, relative {pre_rel:.3e}")
    print(f"{'step':>5} {'max |diff|':>12} {'relative':>11}  token stock/unibuf")
    for r in step_rows:
        i = r["step"]
        mark = "" if r["same_context"] else "  (contexts differ: not compared)"
        print(f"{i:>5} {r['max_abs']:>12.3e} {r['rel']:>11.3e}  {s['tokens'][i]:>6}/{u['tokens'][i]:<6}{mark}")
    if not identical:
        k = same_prefix
        where = "prefill" if k == 0 else f"decode step {k}"
        lg = s["prefill"][-1] if k == 0 else s["steps"][k - 1]
        top2 = torch.topk(lg, 2).values
        print(f"greedy sequences diverge at token {k} (chosen from the {where} logits): stock "
              f"{s['tokens'][k]} vs unibuf {u['tokens'][k]}; stock's top-2 margin there "
              f"{(top2[0] - top2[1]).item():.3e}")
    ref_info = None
    if ref is not None:
        ref_info = {}
        for label, run in (("stock", s), ("unibuf", u)):
            agree = 0
            for a, b in zip(ref["tokens"], run["tokens"]):
                if a != b:
                    break
                agree += 1
            pm, pr = diff(ref["prefill"], run["prefill"])
            steps_same = min(args.tokens, agree)
            dr = max((diff(ref["steps"][i], run["steps"][i])[1] for i in range(steps_same)), default=0.0)
            ref_info[label] = {"tokens_agreeing": agree, "prefill_max_abs": pm, "prefill_rel": pr,
                               "decode_rel": dr, "decode_steps_compared": steps_same}
            print(f"vs float32 reference, {label:>6}: prefill max |diff| {pm:.3e} (relative {pr:.3e}), "
                  f"decode relative {dr:.3e} over {steps_same} steps; {agree}/{len(ref['tokens'])} "
                  "leading tokens agree")
        ref_info["tokens"] = ref["tokens"]
    if tok is not None:
        if ref is not None:
            print(f"f32   : {tok.decode(ref['tokens'])!r}")
        print(f"stock : {tok.decode(s['tokens'])!r}")
        print(f"unibuf: {tok.decode(u['tokens'])!r}")
    print()
    print(rep)

    checks = []

    def check(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    check("prefill logits", pre_rel <= tol, f"relative {pre_rel:.3e} <= {tol:.3e}")
    # Steps after a divergence are left to the token check (their contexts differ).
    check("decode logits", dec_rel <= tol,
          f"max relative {dec_rel:.3e} <= {tol:.3e} over the {len(cmp_steps)}/{args.tokens} "
          "steps with the same context")
    n_tok = len(s["tokens"])
    check("greedy tokens identical", identical and n_tok >= args.min_identical,
          f"{same_prefix}/{n_tok} identical (need all, and >= {args.min_identical})")
    moved = {k: v["bytes"] for k, v in audit.items() if k != "shared"}
    check("copy audit: 0 bytes moved", all(b == 0 for b in moved.values()),
          ", ".join(f"{k} {b} B" for k, b in moved.items()) + f"; shared x{audit['shared']['count']}")
    check("unibuf ops used", UnibufRMSNorm.calls == norm_calls_expected
          and sample_counter["calls"] == samples_expected,
          f"rms_norm x{UnibufRMSNorm.calls} (expected {norm_calls_expected}), "
          f"sample x{sample_counter['calls']} (expected {samples_expected})")

    result = {
        "model": desc,
        "gguf": args.gguf,
        "random_config": args.random_config,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": device_name,
        "unibuf_backend": udev.backend,
        "unibuf_device": udev.name,
        "versions": {"torch": torch.__version__, "unibuf": unibuf.__version__,
                     "transformers": __import__("transformers").__version__,
                     "python": sys.version.split()[0]},
        "layers": n_layers,
        "norms_spliced": len(splice.slots),
        "prompt_tokens": int(ids.shape[1]),
        "decode_steps": args.tokens,
        "tolerance_rel": tol,
        "tolerance_reason": TOLERANCE_REASON[args.dtype],
        "relative_diff_definition": "max |stock - unibuf| / max |stock|, over the compared logits",
        "prefill": {"max_abs": pre_max, "rel": pre_rel},
        "decode_steps_diff": step_rows,
        "decode": {"max_abs": dec_max, "rel": dec_rel, "steps_compared": len(cmp_steps)},
        "tokens": {"stock": s["tokens"], "unibuf": u["tokens"], "identical": identical,
                   "identical_prefix": same_prefix},
        "copy_audit": {"directions": audit, "total_bytes": int(rep.total_bytes),
                       "shared_count": audit["shared"]["count"]},
        "unibuf_calls": {"rms_norm": UnibufRMSNorm.calls, "sample": sample_counter["calls"]},
        "f32_reference": ref_info,
        "decode_tok_s": {"stock": s["tok_s"], "unibuf": u["tok_s"]},
        "decode_seconds": {"stock": s["seconds"], "unibuf": u["seconds"]},
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)

    print(f"tolerance: {TOLERANCE_REASON[args.dtype]}")
    print()
    print(f"summary: {desc} on {device_name} ({args.device}), {args.tokens} decode steps")
    rows = [
        ("prefill logits max |diff| / rel", f"{pre_max:.3e} / {pre_rel:.3e}"),
        ("decode logits max |diff| / rel", f"{dec_max:.3e} / {dec_rel:.3e} ({len(cmp_steps)} steps)"),
        ("tolerance (relative)", f"{tol:.3e}"),
        ("greedy tokens identical", f"{identical} ({same_prefix}/{n_tok})"),
        ("unibuf bytes moved (non-shared)", f"{sum(moved.values())}"),
        ("unibuf shared hand-overs", f"{audit['shared']['count']}"),
    ]
    if ref_info is not None:
        rows += [(f"vs f32 ref: {k} prefill rel / tokens",
                  f"{ref_info[k]['prefill_rel']:.3e} / {ref_info[k]['tokens_agreeing']}/{n_tok} agree")
                 for k in ("stock", "unibuf")]
    rows += [
        ("decode tok/s stock", f"{s['tok_s']:.1f}"),
        ("decode tok/s unibuf", f"{u['tok_s']:.1f} ({u['tok_s'] / s['tok_s']:.2f}x stock)"),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    for c in checks:
        print(f"  [{'PASS' if c['ok'] else 'FAIL'}] {c['check']}: {c['detail']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
