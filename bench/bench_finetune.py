"""Fine-tuning throughput with --freeze_layers 0-12: the cached frozen prefix (layers 0-12 run once
per molecule, stored in fp16, only layers 13-14 per step) against the full 15-layer forward every
step, on the same molecules, batches and seed. Each arm runs in its own process so that its peak
memory is its own. The last line prints the speed-up.
"""
import argparse
import json
import tempfile
import time

import torch

from common import demo_molecules, isolated, machine, peak_rss_mb

from encoders.unimol_conformers import get_conformers
from features import model_inputs
from model import EnergyDPOModel
from settings import ModelSpec, MoleculeSettings, TrainConfig
from train import EnergyDPOTrainer


def run_arm(arm, n, batch_size, epochs, device, cache_dir, strategy="layers", lora_dropout=ModelSpec.lora_dropout):
    torch.manual_seed(0)
    smiles_id, smiles_ood = demo_molecules(n, seed=1, split="train"), demo_molecules(n, seed=2, split="ood_val")
    conformers, _ = get_conformers(smiles_id + smiles_ood, MoleculeSettings(cache_dir, num_workers=2))
    smiles_id = [s for s in smiles_id if s in conformers and s not in smiles_ood]
    smiles_ood = [s for s in smiles_ood if s in conformers]
    spec = ModelSpec(finetune_encoder=True, finetune_strategy=strategy, lora_dropout=lora_dropout)  # freeze 0-12
    net = EnergyDPOModel.from_settings(spec, "random", seed=42)
    encoder = net.encoder
    roles = {"id_train": smiles_id, "ood_train": smiles_ood}
    start = time.perf_counter()
    if arm == "cached":
        inputs = model_inputs(encoder, roles, conformers, cache_dir, device=device)
    else:
        inputs = {r: encoder.role_inputs([conformers[s] for s in m]) for r, m in roles.items()}
    setup = time.perf_counter() - start
    trainer = EnergyDPOTrainer(net, TrainConfig(batch_size=batch_size, device=device), None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [trainer.train_epoch(e, inputs["id_train"], inputs["ood_train"])["train_loss"] for e in range(1, epochs + 1)]
    train_s = time.perf_counter() - start
    seen = epochs * 2 * max(len(smiles_id), len(smiles_ood))
    return {"arm": arm, "strategy": strategy, "molecules_per_s": seen / train_s, "train_s": train_s, "setup_s": setup,
            "losses": losses, "trainable": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
            "peak_rss_mb": peak_rss_mb(), "n_id": len(smiles_id), "n_ood": len(smiles_ood),
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="demo molecules per side")
    p.add_argument("--batch_size", type=int, default=32, help="molecules per side per step")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arm", choices=["cached", "full"], help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="layers", help=argparse.SUPPRESS)
    p.add_argument("--lora_dropout", type=float, default=ModelSpec.lora_dropout, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.n, args.batch_size, args.epochs, args.device, args.cache_dir,
                                 args.strategy, args.lora_dropout)))
        return
    print(f"machine: {machine()}; {args.n} molecules per side, batch {args.batch_size} per side, "
          f"{args.epochs} epochs, device {args.device}")
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        for arm in ("full", "cached"):  # conformers are made by the first arm and shared
            results[arm] = isolated(__file__, arm=arm, cache_dir=cache, n=args.n, batch_size=args.batch_size,
                                    epochs=args.epochs, device=args.device)
    for r in results.values():
        gpu = f", GPU peak {r['gpu_peak_mb']:.0f} MB" if r["gpu_peak_mb"] is not None else ""
        print(f"{r['arm']:<7} {r['molecules_per_s']:7.1f} mol/s  (train {r['train_s']:.1f} s, set-up {r['setup_s']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB{gpu})  epoch losses {['%.6f' % x for x in r['losses']]}")
    gap = max(abs(a - b) for a, b in zip(results["full"]["losses"], results["cached"]["losses"]))
    print(f"max epoch-loss difference {gap:.2e} (fp16 prefix cache)")
    print(f"ratio cached/full training throughput: {results['cached']['molecules_per_s'] / results['full']['molecules_per_s']:.2f}x")


if __name__ == "__main__":
    main()
