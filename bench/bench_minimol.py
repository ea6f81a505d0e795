"""Fine-tuning MiniMol (its real weights): one training epoch per arm on the same demo molecules,
batches and seed, each arm in its own process so that its peak memory is its own.

  all        every weight trains: the whole 16-layer forward and backward each step
  uncached   the last two layers train (--freeze_layers 0-13, the default): the frozen prefix runs
             without autograd each step
  cached     the same, with the frozen prefix's output cached once per molecule (float32)
  lora       LoRA adapters on the last two layers, prefix cached

The first arm featurises the molecules (not timed); the others read its graph cache. The last lines print the ratios.
"""
import argparse
import json
import tempfile
import time

import torch

from common import demo_molecules, isolated, machine, peak_rss_mb

from encoders.minimol import minimol_graphs
from features import model_inputs
from model import EnergyDPOModel
from settings import ModelSpec, MoleculeSettings, TrainConfig
from train import EnergyDPOTrainer

ARMS = {"all": ("none", "layers", False), "uncached": ("0-13", "layers", False), "cached": ("0-13", "layers", True),
        "lora": ("0-13", "lora", True)}


def run_arm(arm, n, batch_size, epochs, device, cache_dir):
    ids, oods = demo_molecules(n, seed=1, split="train"), demo_molecules(n, seed=2, split="ood_val")
    # the first arm featurises, the others read the cache
    graphs, _ = minimol_graphs(ids + oods, MoleculeSettings(cache_dir, num_workers=1))
    ids, oods = [s for s in ids if s in graphs and s not in oods], [s for s in oods if s in graphs]
    freeze, strategy, cached = ARMS[arm]
    torch.manual_seed(0)
    spec = ModelSpec(foundation_model="minimol", finetune_encoder=True, freeze_layers=freeze, finetune_strategy=strategy)
    net = EnergyDPOModel.from_settings(spec, seed=42)
    encoder = net.encoder
    roles = {"id_train": ids, "ood_train": oods}
    start = time.perf_counter()
    if cached:
        inputs = model_inputs(encoder, roles, graphs, cache_dir, device=device)
    else:
        inputs = {r: encoder.role_inputs([graphs[s] for s in m]) for r, m in roles.items()}
    setup = time.perf_counter() - start
    trainer = EnergyDPOTrainer(net, TrainConfig(batch_size=batch_size, device=device), None)
    start = time.perf_counter()
    losses = [trainer.train_epoch(e, inputs["id_train"], inputs["ood_train"])["train_loss"] for e in range(1, epochs + 1)]
    train_s = time.perf_counter() - start
    steps = epochs * -(-max(len(ids), len(oods)) // batch_size)
    return {"arm": arm, "s_per_step": train_s / steps, "setup_s": setup, "losses": losses,
            "trainable": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
            "peak_rss_mb": peak_rss_mb(), "n_id": len(ids), "n_ood": len(oods)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="demo molecules per side")
    p.add_argument("--batch_size", type=int, default=32, help="molecules per side per step")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.n, args.batch_size, args.epochs, args.device, args.cache_dir)))
        return
    print(f"machine: {machine()}; {args.n} molecules per side, batch {args.batch_size} per side, "
          f"{args.epochs} epochs, device {args.device}")
    with tempfile.TemporaryDirectory() as cache:
        results = {arm: isolated(__file__, arm=arm, cache_dir=cache, n=args.n, batch_size=args.batch_size,
                                 epochs=args.epochs, device=args.device) for arm in ARMS}
    for r in results.values():
        print(f"{r['arm']:<9} {r['s_per_step']:7.3f} s/step  trainable {r['trainable']:>9,}  (set-up {r['setup_s']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB)  epoch losses {['%.6f' % x for x in r['losses']]}")
    gap = max(abs(a - b) for a, b in zip(results["uncached"]["losses"], results["cached"]["losses"]))
    print(f"max epoch-loss difference cached vs uncached {gap:.2e}")
    step = {arm: r["s_per_step"] for arm, r in results.items()}
    print(f"ratio step time all/cached {step['all'] / step['cached']:.2f}x, all/lora {step['all'] / step['lora']:.2f}x")
    print(f"ratio prefix cache (uncached/cached step time, last two layers): {step['uncached'] / step['cached']:.2f}x")


if __name__ == "__main__":
    main()
