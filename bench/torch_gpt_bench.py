"""PyTorch baseline for `flint bench gpt`: a nanoGPT-equivalent GPT-2 training step on random tokens.
Model: token + position embeddings, pre-norm blocks (LayerNorm with bias, causal self-attention via
F.scaled_dot_product_attention(is_causal=True), 4x MLP with GELU(approximate="tanh")), final LayerNorm,
lm_head tied to wte, dropout 0. Presets match flint's GptConfig::preset: tiny = vocab 256, context 128,
n_embd 128, 4 layers, 4 heads; gpt2 = 50257, 1024, 768, 12, 12.
Training step = zero_grad(set_to_none=True) + forward + F.cross_entropy vs random targets + backward
+ clip_grad_norm_(1.0) + AdamW(lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on >=2-D params, 0 on others).
FLOPs per step (nanoGPT / PaLM estimate, as flint): 6 * N * tokens + 12 * n_layer * batch * seq^2 * n_embd,
N = parameters except wpe (non-embedding parameters plus the tied head's vocab * n_embd).
On a GPU, `--amp bf16` runs forward and loss under torch.autocast(dtype=torch.bfloat16) (PyTorch's
usual mixed precision: bf16 matmuls and SDPA, fp32 weights and AdamW), the counterpart of flint's
`--precision bf16`; `--amp fp16` adds torch.amp.GradScaler.
Usage: python bench/torch_gpt_bench.py [--preset tiny|gpt2] [--batch-size B] [--seq-len T] [--threads 2]
       [--warmup 3] [--steps 10] [--amp none|bf16|fp16] [--json]"""
import argparse, json, math, statistics, time, torch, torch.nn as nn, torch.nn.functional as F

PRESETS = {  # vocab_size, n_positions, n_embd, n_layer, n_head
    "tiny": (256, 128, 128, 4, 4),
    "gpt2": (50257, 1024, 768, 12, 12),
}

ap = argparse.ArgumentParser()
ap.add_argument("--preset", choices=PRESETS, default="tiny")
ap.add_argument("--batch-size", type=int, default=None, help="default: 16 for tiny, 4 for gpt2")
ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's context")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
ap.add_argument("--json", action="store_true")
args = ap.parse_args()
vocab, n_pos, n_embd, n_layer, n_head = PRESETS[args.preset]
batch = args.batch_size or (16 if args.preset == "tiny" else 4)
seq = args.seq_len or n_pos
if not 1 <= seq <= n_pos or batch < 1 or args.steps < 1:
    ap.error(f"need 1 <= --seq-len <= {n_pos}, --batch-size >= 1 and --steps >= 1")
torch.set_num_threads(args.threads)
torch.manual_seed(0)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(n_embd, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention()
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(n_pos, n_embd)
        self.h = nn.ModuleList(Block() for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():  # GPT-2's initialisation, as nanoGPT
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


device = "cuda" if torch.cuda.is_available() else "cpu"
model = GPT().to(device).train()
params = list(model.parameters())  # the tied weight once
groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
          {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=False)
gen = torch.Generator().manual_seed(0)
x = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
y = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
n = sum(p.numel() for p in params) - model.wpe.weight.numel()
flops = 6 * n * batch * seq + 12 * n_layer * batch * seq * seq * n_embd
amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
scaler = torch.amp.GradScaler(device, enabled=args.amp == "fp16")


def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, vocab), y.view(-1))
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(opt)
    scaler.update()
    if device == "cuda":
        torch.cuda.synchronize()


for _ in range(args.warmup):
    step()
ts = []
for _ in range(args.steps):
    t = time.perf_counter(); step(); ts.append((time.perf_counter() - t) * 1e3)
med = statistics.median(ts)
row = {"impl": f"pytorch {torch.__version__}", "preset": args.preset, "batch": batch, "seq": seq,
       "median_ms": round(med, 2), "min_ms": round(min(ts), 2),
       "tokens_per_s": round(batch * seq / med * 1e3, 2), "gflops": round(flops / med / 1e6, 2),
       "threads": args.threads, "device": device, "amp": args.amp}
print(json.dumps(row) if args.json else
      f"train gpt {args.preset} seq={seq} batch={batch}: median {med:.1f} ms  min {min(ts):.1f} ms  "
      f"{row['tokens_per_s']:.1f} tokens/s  {row['gflops']:.1f} GFLOP/s  ({args.threads} threads, {device})")
