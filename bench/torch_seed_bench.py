# The seed-model baseline this project was given to compare against (../shared/bench/), kept
# here unchanged so that the repository is complete; `flint bench seed` prints the same rows.
"""PyTorch baseline for the seed's SimpleTransformer: 6 x nn.TransformerEncoderLayer(512, 8).
Training step = forward + MSE vs fixed target + backward + AdamW(lr=1e-4) step, dropout active.
Config A: input [10, 32, 512] (the seed's); config B: [128, 32, 512].
Usage: python torch_seed_bench.py [--threads 2] [--warmup 3] [--steps 20] [--configs A,B] [--json]"""
import argparse, json, statistics, time, torch, torch.nn as nn

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--configs", default="A,B")
ap.add_argument("--json", action="store_true")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

class SimpleTransformer(nn.Module):
    def __init__(self, d_model=512, nhead=8):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=d_model, nhead=nhead)
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    def forward(self, x):
        return self.transformer_encoder(x)

device = "cuda" if torch.cuda.is_available() else "cpu"
model = SimpleTransformer().to(device).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
shapes = {"A": (10, 32), "B": (128, 32)}
for name in args.configs.split(","):
    s, b = shapes[name]
    x, y = torch.rand(s, b, 512, device=device), torch.rand(s, b, 512, device=device)
    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if device == "cuda": torch.cuda.synchronize()
    for _ in range(args.warmup): step()
    ts = []
    for _ in range(args.steps):
        t = time.perf_counter(); step(); ts.append((time.perf_counter() - t) * 1e3)
    med = statistics.median(ts)
    row = {"impl": f"pytorch {torch.__version__}", "device": device, "threads": args.threads, "config": name,
           "seq": s, "batch": b, "median_ms": round(med, 2), "min_ms": round(min(ts), 2),
           "tokens_per_s": round(s * b / med * 1e3, 1)}
    print(json.dumps(row) if args.json else
          f"train {name} seq={s} batch={b}: median {med:.1f} ms  min {min(ts):.1f} ms  {row['tokens_per_s']} tokens/s")
