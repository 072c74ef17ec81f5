#!/usr/bin/env python3
"""Generate Hugging Face GPT-2 reference fixtures for flint.

What it generates
-----------------
In ``crates/train/tests/fixtures/gpt2/``, for one tiny randomly initialised
``GPT2LMHeadModel`` (vocab 64, n_positions 16, n_embd 16, 2 layers, 2 heads,
gelu_new, layer_norm_epsilon 1e-5, all dropouts 0, tied ``lm_head``):

* ``model/`` -- the *initial* model exactly as ``save_pretrained(dir,
  safe_serialization=True)`` writes it after casting to float32
  (``config.json``, ``generation_config.json``, ``model.safetensors``).
  transformers omits the tied ``lm_head.weight`` from ``model.safetensors``
  and (in transformers >= 4.2x) GPT-2 has no ``attn.bias`` /
  ``attn.masked_bias`` buffers at all. This file is left byte-for-byte as
  transformers writes it, so its metadata is only ``{"format": "pt"}``.
* ``model_with_buffers.safetensors`` -- every tensor of ``model.state_dict()``
  (float32), i.e. including the tied ``lm_head.weight`` (a copy of
  ``transformer.wte.weight``) and any ``attn.bias`` buffers if state_dict has
  them (the installed transformers has none).
* ``model_legacy_buffers.safetensors`` -- the same plus *synthetic* buffers in
  the layout old GPT-2 checkpoints carried (``transformer.h.<i>.attn.bias``
  float32 [1, 1, n_positions, n_positions] lower-triangular ones and
  ``transformer.h.<i>.attn.masked_bias`` float32 scalar -1e4), so a loader
  can be tested for ignoring buffers. These are not produced by transformers.
* ``forward.safetensors`` -- ``input_ids`` (int32 [2, 8]), ``targets``
  (int32 [2, 8], independent random ids), ``logits`` (f32 [2, 8, 64]) from
  ``model(input_ids).logits``, ``loss`` (f32 [1]) =
  ``F.cross_entropy(logits.view(-1, V), targets.view(-1))`` (no HF label
  shift), and ``grad.<name>`` for every ``named_parameters()`` name.
* ``train5.safetensors`` -- ``micro_input_ids`` / ``micro_targets`` (int32
  [5, 2, 2, 8] = [step, micro-batch, batch, seq]), ``losses`` (f32 [5], mean
  of the 2 undivided micro-batch losses of each step), ``grad_norms`` (f32
  [5], total grad norm before clipping as returned by ``clip_grad_norm_``)
  and ``step5.<name>`` (params after 5 AdamW steps from the initial params;
  decay 0.1 on parameters with dim >= 2, 0 otherwise; each micro-batch loss
  divided by 2 before backward; clip to 1.0; step; zero_grad).
* ``variant/`` and ``variant_forward.safetensors`` -- a second model whose
  fields differ from GPT-2's defaults where ``GPT2Config`` allows it and flint
  computes it (odd vocab 61, n_positions 12, n_embd 18 with 3 heads of 6,
  ``n_inner`` 40 instead of 4 * n_embd, layer_norm_epsilon 1e-6), saved by
  ``save_pretrained``, with the same forward tensors as ``forward.safetensors``
  (input_ids / targets [2, 8]). Drawn after everything above, from seed 1, so
  adding it changed none of the other files.

Weights are the HF ``Conv1D`` layout ([in, out]: ``y = x @ W + b``). The model
is run in ``train()`` mode (dropouts are 0), computed in float64 and stored as
float32. Parameters are drawn/perturbed in float32 and only then promoted to
float64, so the stored float32 weights are *exactly* what the float64
reference used.

Every safetensors file this script writes itself records ``torch_version``
and ``transformers_version`` in its metadata (``train5`` also records lr,
beta1, beta2, eps, weight_decay, grad_clip, grad_accum_steps, steps). Metadata
keys are sorted so the output is byte-for-byte reproducible.

How to run (from the repository root)
-------------------------------------
    pip install torch safetensors transformers
    python scripts/gen_gpt2_fixtures.py

No network access is needed: the model is built from a ``GPT2Config``.
"""

import copy
import json
import os
import shutil
import struct
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D
from fixture_io import save_stable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "crates", "train", "tests", "fixtures", "gpt2")
MODEL_DIR = os.path.join(OUT_DIR, "model")

VOCAB = 64
N_POSITIONS = 16
N_EMBD = 16
N_LAYER = 2
N_HEAD = 2
B = 2  # batch size
T = 8  # sequence length

LR = 1e-2
BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1
GRAD_CLIP = 0.5
GRAD_ACCUM = 2
STEPS = 5


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def i32(t):
    return t.detach().to(torch.int32).contiguous()


def versions():
    return {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def build_model():
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        layer_norm_epsilon=1e-5,
        activation_function="gelu_new",
    )
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "lm_head must be tied"
    perturb(model)
    model.train()
    return model


def perturb(model):
    """Make LayerNorm affine params and all Conv1D biases non-trivial (float32)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
            elif isinstance(m, Conv1D):
                m.bias.copy_(0.02 * torch.randn_like(m.bias))


def logits_of(model, input_ids):
    return model(input_ids.long(), use_cache=False).logits


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.long().reshape(-1))


def write_model_files(model32):
    """model/ (save_pretrained), model_with_buffers and model_legacy_buffers."""
    if os.path.isdir(MODEL_DIR):
        shutil.rmtree(MODEL_DIR)
    model32.save_pretrained(MODEL_DIR, safe_serialization=True)
    for name in os.listdir(MODEL_DIR):
        os.chmod(os.path.join(MODEL_DIR, name), 0o644)

    # .clone(): lm_head.weight shares storage with wte, which save_file rejects.
    state = {k: f32(v).clone() for k, v in model32.state_dict().items()}
    assert "lm_head.weight" in state
    p_buf = os.path.join(OUT_DIR, "model_with_buffers.safetensors")
    save_stable(state, p_buf, versions())

    legacy = dict(state)
    for i in range(N_LAYER):
        bias = f"transformer.h.{i}.attn.bias"
        if bias not in legacy:
            legacy[bias] = torch.tril(torch.ones(N_POSITIONS, N_POSITIONS)).view(
                1, 1, N_POSITIONS, N_POSITIONS)
        masked = f"transformer.h.{i}.attn.masked_bias"
        if masked not in legacy:
            legacy[masked] = torch.tensor(-1e4, dtype=torch.float32)
    p_leg = os.path.join(OUT_DIR, "model_legacy_buffers.safetensors")
    save_stable(legacy, p_leg, dict(versions(), synthetic_buffers="true"))
    return state, p_buf, p_leg


def forward_tensors(model, input_ids, targets):
    """input_ids, targets, logits, loss and grad.<name> of one float64 forward and backward."""
    vocab = model.config.vocab_size
    model.zero_grad()
    logits = logits_of(model, input_ids)
    assert logits.shape == (B, T, vocab) and logits.dtype == torch.float64
    loss = lm_loss(logits, targets)
    loss.backward()
    tensors = {
        "input_ids": i32(input_ids),
        "targets": i32(targets),
        "logits": f32(logits),
        "loss": f32(loss.reshape(1)),
    }
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        tensors["grad." + name] = f32(p.grad)
    model.zero_grad()
    return tensors


def gen_forward(model, input_ids, targets):
    tensors = forward_tensors(model, input_ids, targets)
    path = os.path.join(OUT_DIR, "forward.safetensors")
    save_stable(tensors, path, versions())
    return path, tensors


def gen_train(model, micro_ids, micro_tgts):
    params = [p for _, p in model.named_parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
        eps=ADAM_EPS,
    )
    losses, norms = [], []
    opt.zero_grad()
    for s in range(STEPS):
        step_losses = []
        for m in range(GRAD_ACCUM):
            logits = logits_of(model, micro_ids[s, m])
            loss = lm_loss(logits, micro_tgts[s, m])
            (loss / GRAD_ACCUM).backward()
            step_losses.append(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(torch.stack(step_losses).mean())
        norms.append(norm.detach())

    tensors = {
        "micro_input_ids": i32(micro_ids),
        "micro_targets": i32(micro_tgts),
        "losses": f32(torch.stack(losses)),
        "grad_norms": f32(torch.stack(norms)),
    }
    for name, p in model.named_parameters():
        tensors["step5." + name] = f32(p)
    meta = dict(
        versions(),
        lr=str(LR),
        beta1=str(BETAS[0]),
        beta2=str(BETAS[1]),
        eps=str(ADAM_EPS),
        weight_decay=str(WEIGHT_DECAY),
        grad_clip=str(GRAD_CLIP),
        grad_accum_steps=str(GRAD_ACCUM),
        steps=str(STEPS),
    )
    path = os.path.join(OUT_DIR, "train5.safetensors")
    save_stable(tensors, path, meta)
    return path, tensors


def gen_variant():
    """variant/ and variant_forward.safetensors (see the module docstring)."""
    torch.manual_seed(1)
    vocab = 61
    config = GPT2Config(
        vocab_size=vocab, n_positions=12, n_embd=18, n_layer=2, n_head=3, n_inner=40,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, layer_norm_epsilon=1e-6,
        activation_function="gelu_new",
    )
    model = GPT2LMHeadModel(config)
    perturb(model)
    variant_dir = os.path.join(OUT_DIR, "variant")
    if os.path.isdir(variant_dir):
        shutil.rmtree(variant_dir)
    model.save_pretrained(variant_dir, safe_serialization=True)
    for name in os.listdir(variant_dir):
        os.chmod(os.path.join(variant_dir, name), 0o644)
    input_ids = torch.randint(0, vocab, (B, T))
    targets = torch.randint(0, vocab, (B, T))
    model.double().train()
    tensors = forward_tensors(model, input_ids, targets)
    path = os.path.join(OUT_DIR, "variant_forward.safetensors")
    save_stable(tensors, path, versions())
    return path, tensors


def sanity_check(path, tensor_names, expect_meta):
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata() or {}
        for k in tensor_names:
            assert k in keys, f"{path}: missing {k}"
            assert f.get_tensor(k).dtype in (torch.float32, torch.int32), k
    for k in expect_meta:
        assert k in meta, f"{path}: missing metadata {k}"


def main():
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"writing to {os.path.relpath(OUT_DIR, ROOT)}")
    os.makedirs(OUT_DIR, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        model = build_model()  # float32
        model32 = copy.deepcopy(model)
        state, p_buf, p_leg = write_model_files(model32)

        # Data (int64 in torch, stored int32).
        input_ids = torch.randint(0, VOCAB, (B, T))
        targets = torch.randint(0, VOCAB, (B, T))
        micro_ids = torch.randint(0, VOCAB, (STEPS, GRAD_ACCUM, B, T))
        micro_tgts = torch.randint(0, VOCAB, (STEPS, GRAD_ACCUM, B, T))

        model.double()
        model.train()
        init_model = copy.deepcopy(model)
        assert init_model.lm_head.weight is init_model.transformer.wte.weight

        p_fwd, fwd = gen_forward(model, input_ids, targets)
        p_tr, tr = gen_train(init_model, micro_ids, micro_tgts)
        p_var, var = gen_variant()

    # --- checks ---
    pnames = [n for n, _ in model.named_parameters()]
    sanity_check(p_fwd, list(fwd), list(versions()))
    sanity_check(p_tr, list(tr), list(versions()) + [
        "lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip",
        "grad_accum_steps", "steps"])
    sanity_check(p_var, list(var), list(versions()))
    sanity_check(p_buf, list(state), list(versions()))
    sanity_check(p_leg, list(state), list(versions()))
    with safe_open(os.path.join(MODEL_DIR, "model.safetensors"), framework="pt") as f:
        hf_keys = sorted(f.keys())
        for k in hf_keys:  # the HF file holds exactly the float32 initial params
            assert torch.equal(f.get_tensor(k), state[k]), k
    # Reloading the saved model reproduces the float64 logits from the fixtures.
    reloaded = GPT2LMHeadModel.from_pretrained(MODEL_DIR).double().train()
    with torch.no_grad():
        re_logits = logits_of(reloaded, input_ids)
    assert torch.allclose(f32(re_logits), fwd["logits"], atol=1e-6), "reload mismatch"

    print(f"named_parameters ({len(pnames)}): {pnames}")
    print(f"model/model.safetensors tensors ({len(hf_keys)}): {hf_keys}")
    print(f"  lm_head.weight present: {'lm_head.weight' in hf_keys}; "
          f"attn.bias/masked_bias present: "
          f"{any(k.endswith(('.attn.bias', '.attn.masked_bias')) for k in hf_keys)}; "
          f"state_dict buffers: {[n for n, _ in model.named_buffers()]}")
    print(f"forward loss = {fwd['loss'].item():.6f}")
    print(f"train5 losses = {[round(x, 6) for x in tr['losses'].tolist()]}")
    print(f"train5 grad_norms = {[round(x, 6) for x in tr['grad_norms'].tolist()]}")
    total = 0
    for dirpath, _, files in sorted(os.walk(OUT_DIR)):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            total += os.path.getsize(p)
            print(f"  {os.path.relpath(p, OUT_DIR):40s} {os.path.getsize(p):8d} B")
    print(f"total fixture size: {total} B")
    for wi in caught:
        print(f"warning: {wi.category.__name__}: {wi.message} ({wi.filename}:{wi.lineno})")
    assert total < 300_000


if __name__ == "__main__":
    main()
