"""Fine-tuning strategies side by side (--freeze_layers 0-12, the frozen prefix cached): training
throughput and peak memory of layers, attention, ffn and lora at the same molecules, batch size and
seed, each in its own process; LoRA also with --lora_dropout 0.05, whose dropout masks cost time on
CPU. The last lines print LoRA's throughput relative to layers, with dropout 0.05 and at the default 0.
"""
import argparse
import tempfile

import torch

from common import ROOT, isolated, machine

from encoders import STRATEGIES



def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="demo molecules per side")
    p.add_argument("--batch_size", type=int, default=256, help="molecules per side per step")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated; layers and lora always run")
    args = p.parse_args()
    chosen = [s for s in STRATEGIES if s in args.strategies.split(",") or s in ("layers", "lora")]
    print(f"machine: {machine()}; {args.n} molecules per side, batch {args.batch_size} per side, "
          f"{args.epochs} epochs, device {args.device}")
    results = {}
    with tempfile.TemporaryDirectory() as cache:  # conformers and prefix states: made once, shared
        for strategy in chosen:
            for name, dropout in ((("lora", 0.0), ("lora_drop0.05", 0.05)) if strategy == "lora"
                                  else ((strategy, 0.0),)):
                results[name] = isolated(ROOT / "bench" / "bench_finetune.py", arm="cached", strategy=strategy,
                                         lora_dropout=dropout, cache_dir=cache, n=args.n, batch_size=args.batch_size,
                                         epochs=args.epochs, device=args.device)
    print(f"{'strategy':<14} {'trainable':>10} {'mol/s':>7} {'peak RSS MB':>11} {'GPU peak MB':>11}  epoch losses")
    for s, r in results.items():
        gpu = f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] is not None else "–"
        print(f"{s:<14} {r['trainable']:>10,} {r['molecules_per_s']:7.1f} {r['peak_rss_mb']:11.0f} {gpu:>11}  "
              f"{['%.6f' % x for x in r['losses']]}")
    print(f"ratio lora (--lora_dropout 0.05)/layers training throughput: "
          f"{results['lora_drop0.05']['molecules_per_s'] / results['layers']['molecules_per_s']:.2f}x")
    print(f"ratio lora/layers training throughput: "
          f"{results['lora']['molecules_per_s'] / results['layers']['molecules_per_s']:.2f}x")


if __name__ == "__main__":
    main()
