#!/usr/bin/env python3
"""Generate PyTorch reference fixtures for flint's TransformerEncoder.

What it generates
-----------------
For each case below, three files in
``crates/train/tests/fixtures/encoder/``:

* ``<case>.json`` -- the encoder config (d_model, nhead, dim_feedforward,
  dropout, activation, layer_norm_eps, batch_first, norm_first, num_layers,
  final_norm).
* ``<case>.weights.safetensors`` -- the initial ``state_dict`` (float32). For
  ``post_relu`` and ``padding_causal`` every key is prefixed with
  ``transformer_encoder.`` (as if the encoder were wrapped in a module
  attribute); the other cases use the encoder's own names.
* ``<case>.safetensors`` -- ``src``, optional ``src_key_padding_mask`` (uint8,
  nonzero = padding), ``target``, ``output`` (forward from the initial
  params), ``loss`` ([1], mean MSE), ``grad.<name>`` for every parameter,
  ``step3.<name>`` (params after 3 AdamW steps) and ``losses3`` ([3], the loss
  at each step before its update).

The model is ``nn.TransformerEncoder`` in training mode with dropout 0.0,
computed in float64 and stored as float32. Parameters, ``src`` and ``target``
are drawn in float32 and then promoted to float64, so the stored float32
weights/inputs are *exactly* the values the float64 reference used.

Each file's safetensors metadata records ``torch_version`` (torch.__version__);
``<case>.safetensors`` also records causal, lr, beta1, beta2, eps,
weight_decay and steps.

How to run (from the repository root)
-------------------------------------
    pip install torch safetensors; python scripts/gen_encoder_fixtures.py
"""

import copy
import json
import os
import struct
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from fixture_io import save_stable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "crates", "train", "tests", "fixtures", "encoder")

D_MODEL = 16
NHEAD = 4
DIM_FF = 24
NUM_LAYERS = 2
S = 5  # sequence length
N = 3  # batch size

LR = 1e-2
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.01
STEPS = 3

PREFIX = "transformer_encoder."

# name, norm_first, activation, batch_first, final_norm, eps, padding, causal, prefixed
CASES = [
    ("post_relu", False, "relu", False, True, 1e-5, False, False, True),
    ("pre_gelu", True, "gelu", True, True, 1e-6, False, False, False),
    ("padding", False, "relu", True, False, 1e-5, True, False, False),
    ("causal", True, "gelu", False, False, 1e-5, False, True, False),
    ("padding_causal", False, "gelu", False, True, 1e-5, True, True, True),
]


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def build_model(norm_first, activation, batch_first, final_norm, eps):
    layer = nn.TransformerEncoderLayer(
        D_MODEL,
        NHEAD,
        DIM_FF,
        dropout=0.0,
        activation=activation,
        layer_norm_eps=eps,
        batch_first=batch_first,
        norm_first=norm_first,
    )
    model = nn.TransformerEncoder(
        layer,
        NUM_LAYERS,
        norm=nn.LayerNorm(D_MODEL, eps=eps) if final_norm else None,
        enable_nested_tensor=False,
    )
    # Make LayerNorm affine params non-trivial (drawn in float32).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    model.double()
    model.train()
    return model


def forward(model, src, pad_mask, causal):
    kwargs = {}
    if pad_mask is not None:
        kwargs["src_key_padding_mask"] = pad_mask.bool()
    if causal:
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(S, dtype=torch.float64)
        kwargs["is_causal"] = True
    return model(src, **kwargs)


def gen_case(name, norm_first, activation, batch_first, final_norm, eps, padding, causal, prefixed):
    torch.manual_seed(0)
    model = build_model(norm_first, activation, batch_first, final_norm, eps)
    init_model = copy.deepcopy(model)  # pristine initial params for the AdamW run
    init_state = {k: f32(v) for k, v in model.state_dict().items()}

    shape = (N, S, D_MODEL) if batch_first else (S, N, D_MODEL)
    src = torch.randn(shape).double()
    target = torch.randn(shape).double()  # output has the same shape as src
    pad_mask = None
    if padding:
        pad_mask = torch.zeros(N, S, dtype=torch.uint8)
        pad_mask[1, S - 2:] = 1
        pad_mask[2, S - 1:] = 1

    # --- gradients from the initial params ---
    model.zero_grad()
    output = forward(model, src, pad_mask, causal)
    assert output.shape == target.shape
    loss = F.mse_loss(output, target)
    loss.backward()

    tensors = {"src": f32(src)}
    if pad_mask is not None:
        tensors["src_key_padding_mask"] = pad_mask.contiguous()
    tensors["target"] = f32(target)
    tensors["output"] = f32(output)
    tensors["loss"] = f32(loss.reshape(1))
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        tensors["grad." + pname] = f32(p.grad)

    # --- 3 AdamW steps from the initial params ---
    m2 = init_model
    opt = torch.optim.AdamW(
        m2.parameters(), lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY
    )
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = forward(m2, src, pad_mask, causal)
        l = F.mse_loss(out, target)
        l.backward()
        opt.step()
        losses.append(l.detach())
    assert torch.equal(losses[0], loss.detach())
    for pname, p in m2.named_parameters():
        tensors["step3." + pname] = f32(p)
    tensors["losses3"] = f32(torch.stack(losses))

    # --- write files ---
    os.makedirs(OUT_DIR, exist_ok=True)
    cfg = {
        "d_model": D_MODEL,
        "nhead": NHEAD,
        "dim_feedforward": DIM_FF,
        "dropout": 0.0,
        "activation": activation,
        "layer_norm_eps": eps,
        "batch_first": batch_first,
        "norm_first": norm_first,
        "num_layers": NUM_LAYERS,
        "final_norm": final_norm,
    }
    json_path = os.path.join(OUT_DIR, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")

    weights = {(PREFIX + k if prefixed else k): v for k, v in init_state.items()}
    w_path = os.path.join(OUT_DIR, f"{name}.weights.safetensors")
    save_stable(weights, w_path, {"torch_version": torch.__version__})

    meta = {
        "torch_version": torch.__version__,
        "causal": "true" if causal else "false",
        "lr": str(LR),
        "beta1": str(BETAS[0]),
        "beta2": str(BETAS[1]),
        "eps": str(ADAM_EPS),
        "weight_decay": str(WEIGHT_DECAY),
        "steps": str(STEPS),
    }
    t_path = os.path.join(OUT_DIR, f"{name}.safetensors")
    save_stable(tensors, t_path, meta)
    return [json_path, w_path, t_path], tensors, list(weights)


def sanity_check(path, tensor_names, expect_meta):
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        for k in tensor_names:
            assert k in keys, f"{path}: missing {k}"
            assert f.get_tensor(k).dtype in (torch.float32, torch.uint8), k
    for k in expect_meta:
        assert k in meta, f"{path}: missing metadata {k}"


def main():
    torch.set_printoptions(precision=6)
    caught = []
    total = 0
    print(f"torch {torch.__version__}; writing to {os.path.relpath(OUT_DIR, ROOT)}")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for case in CASES:
            name = case[0]
            paths, tensors, wkeys = gen_case(*case)
            sanity_check(paths[2], list(tensors),
                         ["torch_version", "causal", "lr", "beta1", "beta2",
                          "eps", "weight_decay", "steps"])
            sanity_check(paths[1], wkeys, ["torch_version"])
            sizes = [os.path.getsize(p) for p in paths]
            total += sum(sizes)
            desc = ", ".join(f"{os.path.basename(p)} ({s} B)" for p, s in zip(paths, sizes))
            print(f"{name:15s} loss={tensors['loss'].item():.6f} "
                  f"losses3={[round(x, 6) for x in tensors['losses3'].tolist()]}  {desc}")
        caught = list(w)
    print(f"total fixture size: {total} B")
    for wi in caught:
        print(f"warning: {wi.category.__name__}: {wi.message} ({wi.filename}:{wi.lineno})")
    assert total < 1_000_000


if __name__ == "__main__":
    main()
