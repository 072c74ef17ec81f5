#!/usr/bin/env python3
"""Generate the end-to-end `flint train` fixture: one command against a float64 PyTorch run.

What it generates
-----------------
In ``crates/cli/tests/fixtures/train_run/`` (checked by ``crates/cli/tests/train_vs_torch.rs``):

* ``init/`` -- ``config.json`` and ``model.safetensors`` of a small random
  ``GPT2LMHeadModel`` (vocab 256, n_positions 32, n_embd 32, 2 layers, 2 heads,
  gelu_new, all dropouts 0, tied ``lm_head``), written by ``save_pretrained``
  in float32. Every 1-D parameter (all biases, LayerNorm weights and biases)
  gets random noise, as HF initialises them to exactly 0 or 1 and a bias that
  is ignored would then go unnoticed.
* ``data.txt`` -- about 6 KB of ASCII English: the sentences below, shuffled
  into paragraphs with a fixed seed. Its length is picked so that holding out
  ``N * 0.1`` tokens differs between rounding (what flint does) and truncating.
* ``expected.json`` -- the run of ``FLAGS`` (below) computed by an independent
  float64 PyTorch reference of ``flint train``'s documented semantics (README,
  ``flint train``): per step ``loss``, ``lr`` and ``grad_norm``; ``val_loss``
  at each evaluation; the flags; the torch and transformers versions; facts
  about the data (token counts, the steps where the loader wraps around) and
  the steps whose gradient was clipped.

The reference, step by step:

* Tokens: the ``bytes`` tokenizer turns the file (one document, so no
  separator) into one token per byte. The last ``max(1, round(N * F))`` tokens
  are the validation split, the rest the training split.
* Loader (``--data-order sequential``, llm.c's): windows of ``B*T + 1`` tokens
  starting at 0, B*T apart; a window that would pass the end starts over at 0.
  Inputs are the first ``B*T`` tokens of a window, targets the last.
* A step: ``--grad-accum-steps`` micro-batches, each loss (mean cross-entropy)
  divided by their number before backward; the step's ``loss`` is their mean.
  ``clip_grad_norm_`` (its returned norm, before clipping, is ``grad_norm``),
  then ``torch.optim.AdamW`` with decay on parameters of >= 2 dimensions only,
  at the cosine-with-warm-up learning rate of that step (``lr * step /
  warmup_steps`` up to ``warmup_steps``, then cosine down to ``min_lr`` at the
  last step).
* Evaluation: the mean loss of the first ``min(20, (V - 1) // (B*T))``
  batches of the validation split (``V`` tokens) read by a fresh sequential
  loader, for the initial model (step 0), after every ``--eval-every``-th
  update and after the last.

With the committed files: the validation split is the last 612 of 6119 tokens
(truncating would hold out 611), evaluations average 2 batches, the training
loader wraps around in step 11, between its two micro-batches, and clipping
(``--grad-clip 1.2``) happens at steps 1 to 7 and not at 8 to 12 (the norms
fall from 1.60 to 1.00); ``expected.json`` lists them as ``clipped_steps``.

The learning rate (1e-2) and weight decay (0.5) are high so that 12 steps move
the model far enough for a wrong semantic to show: in this reference, clipping
at 1.0 instead, not clipping, no decay, decay on 1-D tensors too, the loss not
divided by the micro-batch count, ``--warmup-steps 2`` or one evaluation batch
each change some loss, val_loss or grad_norm by 4e-4 or more, and truncating the
validation split changes val_loss by 1.4e-4; the test allows 1e-5 (1e-4 for
grad_norm), while flint's float32 run is within 1e-7.

The committed files were made with torch 2.15.0 and transformers 5.24.0 (also
recorded in ``expected.json``). Computation is single-threaded float64 from
the float32 weights that ``init/`` holds; output is byte-for-byte
reproducible (fixed seeds, sorted keys).

How to run (from the repository root)
-------------------------------------
    pip install torch safetensors transformers
    python3 scripts/gen_train_fixture.py

No network access is needed: the model is built from a ``GPT2Config``.
"""

import json
import math
import os
import random
import shutil

import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "crates", "cli", "tests", "fixtures", "train_run")
INIT_DIR = os.path.join(OUT_DIR, "init")
DATA = os.path.join(OUT_DIR, "data.txt")

# The run: `flint train --init-from init --data data.txt` followed by these flags (every one
# takes a value). The test adds only `--device cpu` and `--out`.
FLAGS = [
    "--tokenizer", "bytes",
    "--data-order", "sequential",
    "--batch-size", "16",
    "--seq-len", "16",
    "--grad-accum-steps", "2",
    "--steps", "12",
    "--lr", "1e-2",
    "--min-lr", "1e-3",
    "--lr-schedule", "cosine",
    "--warmup-steps", "3",
    "--weight-decay", "0.5",
    "--beta1", "0.9",
    "--beta2", "0.95",
    "--eps", "1e-8",
    "--grad-clip", "1.2",
    "--dropout", "0",
    "--val-fraction", "0.1",
    "--eval-every", "5",
    "--seed", "1",
]

MIN_DATA_BYTES = 6000
VAL_BATCHES_MAX = 20  # llm.c's val_max_steps

SENTENCES = [
    "The river ran low that summer, and the stones on its bed turned white in the sun.",
    "Every morning the baker opened his shutters before the first bus came down the hill.",
    "A map is only useful if you know where you are standing when you unfold it.",
    "The children counted the boats in the harbour and always got a different number.",
    "Rain arrived in the afternoon, soft at first, then heavy enough to drown the radio.",
    "She kept her grandfather's watch in a drawer, wound it on Sundays, and never wore it.",
    "Nobody in the village remembered who had planted the old pear tree by the church.",
    "The train was late again, so the passengers talked about the weather and their work.",
    "He wrote the numbers down twice, because the first time his hand had been shaking.",
    "A good soup needs time more than it needs salt, or so the cook liked to say.",
    "The library closed at six, but the caretaker let the students stay until seven.",
    "When the wind turned north, the fishermen pulled their nets in and went home early.",
    "The bridge had been painted green, then grey, and now nobody could agree on a colour.",
    "Her letters were short and plain, and she signed every one of them with a small star.",
    "On clear nights the lighthouse keeper could see the lamps of three other towns.",
    "The garden was mostly weeds, yet the tomatoes grew better there than anywhere else.",
    "Two cats lived in the bookshop and slept on whichever shelf was warmest that day.",
    "The teacher asked a simple question and waited a long time for a simple answer.",
    "Snow closed the pass for a week, and the mail came up the valley on a tractor.",
    "The market sold apples, onions, honey, wool, and sometimes a very tired goat.",
    "He learned to play the violin at forty, badly at first and then a little better.",
    "The old road follows the river, while the new one cuts straight through the hills.",
    "In the evening the square filled with people who had nowhere in particular to be.",
    "She measured the flour by eye and the butter by memory, and the bread was perfect.",
    "The clock in the hall struck thirteen once, and the whole family still talks about it.",
    "A small boat can cross the lake in an hour if the water is calm and the oars are good.",
    "The doctor walked to every house on her rounds, even when the path was deep in mud.",
    "They built the school from the stones of the castle that had stood on the same hill.",
    "The first frost came early and blackened the beans before anyone had picked them.",
    "A quiet street at dawn sounds like birds, milk bottles, and a door closing somewhere.",
    "The captain read the sky the way other people read the morning paper.",
    "His notebook was full of drawings of bridges he would never have the money to build.",
    "The festival lasted three days, and on the fourth the town slept until noon.",
    "Water finds the lowest place, and so, the farmers said, does bad news.",
    "The museum had one famous painting and forty rooms of things nobody came to see.",
    "She taught her brother to swim by throwing his shoes into the shallow end.",
    "The harvest was late, but the barn was full by the time the geese flew south.",
    "Old maps show a forest where the car park is now, and a well where the bank stands.",
]


def settings():
    """FLAGS as a dict from flag to value."""
    assert len(FLAGS) % 2 == 0 and all(f.startswith("--") for f in FLAGS[0::2])
    return dict(zip(FLAGS[0::2], FLAGS[1::2]))


def round_half_up(x):
    """Rust's f64::round for x >= 0 (Python's round() rounds half to even)."""
    return math.floor(x + 0.5)


def val_len(n, fraction):
    return max(1, round_half_up(n * fraction)) if fraction > 0 else 0


def make_text(fraction):
    """Paragraphs of 3 to 6 shuffled sentences, cut after the first sentence that makes the
    text long enough and rounds its held-out length N * F up (truncating would not)."""
    rng = random.Random(0)
    paragraphs = [" ".join(rng.sample(SENTENCES, rng.randint(3, 6))) for _ in range(40)]
    full = "\n\n".join(paragraphs)
    for end, char in enumerate(full, start=1):
        n = end + 1  # the text ends with a newline
        if char == "." and n >= MIN_DATA_BYTES and (n * fraction) % 1 > 0.6:
            return full[:end] + "\n"
    raise AssertionError("not enough sentences")


def build_model():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        layer_norm_epsilon=1e-5,
        activation_function="gelu_new",
        bos_token_id=None,  # GPT-2's 50256 is outside a byte vocabulary
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model


def save_init(model):
    if os.path.isdir(INIT_DIR):
        shutil.rmtree(INIT_DIR)
    model.save_pretrained(INIT_DIR, safe_serialization=True)
    for name in os.listdir(INIT_DIR):
        path = os.path.join(INIT_DIR, name)
        if name in ("config.json", "model.safetensors"):
            os.chmod(path, 0o644)
        else:
            os.remove(path)  # generation_config.json: flint does not read it


class SequentialLoader:
    """llm.c's loader: windows of B*T + 1 tokens, B*T apart, back to 0 at the end."""

    def __init__(self, tokens, b, t):
        self.tokens, self.b, self.t, self.pos = tokens, b, t, 0
        self.wrapped = False  # whether the last window started over at 0

    def next(self):
        n = self.b * self.t
        self.wrapped = self.pos + n + 1 > len(self.tokens)
        if self.wrapped:
            self.pos = 0
        window = self.tokens[self.pos:self.pos + n + 1]
        self.pos += n
        return window[:-1].view(self.b, self.t), window[1:].view(self.b, self.t)


def loss_of(model, inputs, targets):
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lr_at(step, s):
    lr, min_lr = float(s["--lr"]), float(s["--min-lr"])
    warmup, steps = int(s["--warmup-steps"]), int(s["--steps"])
    if step <= warmup:
        return lr * step / warmup
    p = (step - warmup) / (steps - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * p)) / 2


def reference(model, tokens, s):
    """Runs FLAGS on `model` (float64, changed in place); returns expected.json's run fields."""
    assert s["--tokenizer"] == "bytes" and s["--data-order"] == "sequential"
    assert s["--lr-schedule"] == "cosine" and float(s["--dropout"]) == 0
    b, t = int(s["--batch-size"]), int(s["--seq-len"])
    accum, steps = int(s["--grad-accum-steps"]), int(s["--steps"])
    clip, eval_every = float(s["--grad-clip"]), int(s["--eval-every"])

    n = len(tokens)
    n_val = val_len(n, float(s["--val-fraction"]))
    train, val = tokens[:n - n_val], tokens[n - n_val:]
    val_batches = min(VAL_BATCHES_MAX, (len(val) - 1) // (b * t))
    assert val_batches >= 2, "the fixture should average more than one validation batch"

    params = list(model.parameters())  # the tied wte / lm_head once
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": matrices, "weight_decay": float(s["--weight-decay"])},
            {"params": vectors, "weight_decay": 0.0},
        ],
        lr=float(s["--lr"]),
        betas=(float(s["--beta1"]), float(s["--beta2"])),
        eps=float(s["--eps"]),
    )

    def evaluate(step):
        loader = SequentialLoader(val, b, t)
        with torch.no_grad():
            total = sum(loss_of(model, *loader.next()).item() for _ in range(val_batches))
        return {"step": step, "val_loss": total / val_batches}

    loader = SequentialLoader(train, b, t)
    evals, train_lines, wraps, clipped = [evaluate(0)], [], [], []
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for _ in range(accum):
            micro = loss_of(model, *loader.next()) / accum
            micro.backward()
            loss += micro.item()
            if loader.wrapped:
                wraps.append(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        if grad_norm > clip:
            clipped.append(step)
        lr = lr_at(step, s)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        train_lines.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        if step % eval_every == 0 or step == steps:
            evals.append(evaluate(step))

    assert wraps and wraps[-1] < steps, "the training loader should wrap around within the run"
    assert clipped and len(clipped) < steps, "clipping should happen on some steps, not all"
    return {
        "data": {
            "tokens": n,
            "train_tokens": len(train),
            "val_tokens": len(val),
            "val_batches": val_batches,
            "loader_wraps_at_steps": wraps,
        },
        "clipped_steps": clipped,
        "train": train_lines,
        "eval": evals,
    }


def main():
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    torch.set_num_threads(1)  # one summation order: byte-for-byte reproducible
    s = settings()
    os.makedirs(OUT_DIR, exist_ok=True)

    text = make_text(float(s["--val-fraction"]))
    with open(DATA, "w", encoding="ascii", newline="\n") as f:
        f.write(text)
    os.chmod(DATA, 0o644)

    save_init(build_model())
    # The reference starts from exactly the float32 weights flint reads.
    model = GPT2LMHeadModel.from_pretrained(INIT_DIR, dtype=torch.float32).double()
    model.train()  # dropouts are 0
    assert model.lm_head.weight is model.transformer.wte.weight, "lm_head must be tied"
    with open(DATA, "rb") as f:
        tokens = torch.tensor(list(f.read()), dtype=torch.long)  # the bytes tokenizer

    expected = {
        "command": "flint train --init-from init --data data.txt " + " ".join(FLAGS),
        "flags": FLAGS,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        **reference(model, tokens, s),
    }
    with open(os.path.join(OUT_DIR, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"data: {expected['data']}")
    print(f"clipped steps: {expected['clipped_steps']}")
    for line in expected["train"]:
        print(f"  step {line['step']:2d}  loss {line['loss']:.6f}  lr {line['lr']:.3e}  "
              f"grad_norm {line['grad_norm']:.4f}")
    for line in expected["eval"]:
        print(f"  step {line['step']:2d}  val_loss {line['val_loss']:.6f}")
    total = 0
    for dirpath, _, files in sorted(os.walk(OUT_DIR)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            total += os.path.getsize(path)
            print(f"  {os.path.relpath(path, OUT_DIR):28s} {os.path.getsize(path):8d} B")
    print(f"total fixture size: {total} B")
    assert total < 200_000


if __name__ == "__main__":
    main()
