"""Featurisation speed, ours vs unimol_tools, on the same demo molecules and the same random-init
checkpoint (SMILES → frozen Uni-Mol CLS features).

  cold            empty caches: conformers (both sides: one process per core) + encoder forward
  warm conformers the same molecules under other weights: our conformers come from the cache,
                  UniMolRepr recomputes them on every call
  bf16            our path with --amp bf16 (encoder forward only), against our fp32 features

Both sides get the SMILES as the demo file writes them (not canonicalised) and a model built before
the clock starts. The last line prints the throughput ratios (ours / unimol_tools).
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

from common import demo_molecules, machine, random_checkpoint

from encoders.base import prepare_rows
from encoders.unimol import UniMolEncoder, _import_unimol_model
from encoders.unimol_conformers import MAX_ATOMS, unimol_dict_path
from features import frozen_features
from settings import MoleculeSettings


def ours(weights, smiles, cache_dir, workers, batch_size, device, amp=False):
    encoder = UniMolEncoder(str(weights), amp=amp)
    start = time.perf_counter()
    written, conformers, failed = prepare_rows(encoder, smiles, MoleculeSettings(cache_dir, num_workers=workers))
    feats = frozen_features(encoder, list(written.values()), conformers, cache_dir, batch_size, device)
    return time.perf_counter() - start, feats, set(written.values()), conformers


def theirs(weights, smiles, device):
    _import_unimol_model()  # keeps unimol_tools from writing ./logs
    from unimol_tools import UniMolRepr
    model = UniMolRepr(remove_hs=True, use_cuda=device != "cpu", pretrained_model_path=str(weights),
                       pretrained_dict_path=str(unimol_dict_path()))
    start = time.perf_counter()
    feats = np.asarray(model.get_repr(smiles))
    return time.perf_counter() - start, feats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="demo molecules")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="our conformer processes")
    p.add_argument("--batch_size", type=int, default=64, help="our encoder batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    smiles = demo_molecules(args.n)
    print(f"machine: {machine()}; {len(smiles)} demo molecules; device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_a, ckpt_b = random_checkpoint(f"{tmp}/a.pt", 7), random_checkpoint(f"{tmp}/b.pt", 8)
        cache = f"{tmp}/cache"
        t_theirs_a, f_theirs = theirs(ckpt_a, smiles, args.device)
        t_cold, f_cold, ok, conformers = ours(ckpt_a, smiles, cache, args.workers, args.batch_size, args.device)
        t_theirs_b, _ = theirs(ckpt_b, smiles, args.device)
        t_warm, _, _, _ = ours(ckpt_b, smiles, cache, args.workers, args.batch_size, args.device)
        t_bf16, f_bf16, _, _ = ours(ckpt_a, smiles, cache, args.workers, args.batch_size, args.device, amp=True)
    kept = [i for i, s in enumerate(smiles) if s in ok]
    uncropped = [j for j, i in enumerate(kept) if len(conformers[smiles[i]][0]) < MAX_ATOMS]
    diff = np.abs(f_cold[uncropped] - f_theirs[kept][uncropped]).max()
    cos = (f_bf16 * f_cold).sum(1) / np.linalg.norm(f_bf16, axis=1) / np.linalg.norm(f_cold, axis=1)
    n = len(smiles)
    rate = lambda t: n / t  # noqa: E731
    print(f"{'path':<34} {'seconds':>8} {'mol/s':>8}")
    for name, t in (("unimol_tools UniMolRepr (weights A)", t_theirs_a), ("ours, cold caches (weights A)", t_cold),
                    ("unimol_tools UniMolRepr (weights B)", t_theirs_b), ("ours, conformers cached (weights B)", t_warm),
                    ("ours, conformers cached, bf16 (A)", t_bf16)):
        print(f"{name:<34} {t:8.1f} {rate(t):8.1f}")
    print(f"features vs unimol_tools: max |diff| {diff:.2e} over {len(uncropped)} molecules under {MAX_ATOMS} atoms "
          f"({'OK' if diff < 1e-4 else 'MISMATCH'}); bf16 vs fp32: max |diff| {np.abs(f_bf16 - f_cold).max():.3f}, "
          f"min cosine {cos.min():.6f}")
    print(f"ratio ours/unimol_tools: cold {t_theirs_a / t_cold:.2f}x, conformers cached {t_theirs_b / t_warm:.2f}x, "
          f"conformers cached + bf16 {t_theirs_b / t_bf16:.2f}x")


if __name__ == "__main__":
    main()
