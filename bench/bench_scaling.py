"""Scaling beyond one process, measured on this machine.

  featurize   wall time of `main.py --mode featurize` on drug-sized demo molecules (≤ 50 heavy
              atoms) from an empty cache:
              one process (--num_workers 1 and --num_workers <cores>) against
              `torchrun --nproc_per_node 2` (each rank --num_workers 1, computing its share)
  predict     peak RSS of `main.py --mode predict` on N and 4N distinct molecules from an empty
              cache: predict streams its input in chunks, so the peak should not grow with N

Whole commands are timed, interpreter start-up included (as a user sees them). The last line
prints the featurisation throughput ratio of 2 processes vs 1 and the two peak RSS values.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rdkit import Chem

from common import ROOT, demo_molecules, machine, random_checkpoint

DRUG_SIZED = 50  # heavy atoms: the demo's few macrocycles would dominate a small sample's time
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
MAIN = str(ROOT / "main.py")
# predict, reporting its peak RSS (with a smaller --chunk_rows than the default, so that both sizes
# span several chunks)
PREDICT_WITH_RSS = ("import resource, sys; sys.path.insert(0, sys.argv[1]); import main; "
                    "code = main.main(sys.argv[2:]); "
                    "print('peak_rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); "
                    "sys.exit(code)")


def timed(command):
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def featurize(work, weights, smiles_file, n, label, launcher, workers):
    cache = work / f"cache-{label}"
    seconds, _ = timed([*launcher, MAIN, "--mode", "featurize", "--input", str(smiles_file), "--unimol_weights",
                        str(weights), "--cache_dir", str(cache), "--num_workers", str(workers),
                        "--output", str(work / f"{label}.npy")])
    print(f"featurize {label:<28} {seconds:7.1f} s  {n / seconds:6.1f} mol/s", flush=True)
    return n / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="molecules to featurise")
    p.add_argument("--predict_n", type=int, default=600, help="the smaller predict input (the larger is 4x)")
    p.add_argument("--predict_chunk", type=int, default=200, help="predict's chunk for this bench")
    p.add_argument("--run", help="a finished run to predict with (default: a tiny frozen run trained here)")
    args = p.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = random_checkpoint(work / "random.pt", init_seed=3)
        smiles = [s for s in demo_molecules(4 * (args.n + 5 * args.predict_n) + 50, seed=1)
                  if Chem.MolFromSmiles(s).GetNumHeavyAtoms() <= DRUG_SIZED][:args.n + 5 * args.predict_n]
        featurize_in = work / "featurize.smi"
        featurize_in.write_text("".join(f"{s}\n" for s in smiles[:args.n]))
        one = featurize(work, weights, featurize_in, args.n, "1 process, 1 worker", [PYTHON], 1)
        cores = os.cpu_count()
        many = featurize(work, weights, featurize_in, args.n, f"1 process, {cores} workers", [PYTHON], cores)
        two = featurize(work, weights, featurize_in, args.n, "torchrun 2 processes",
                        [TORCHRUN, "--standalone", "--nproc_per_node", "2"], 1)

        run = Path(args.run) if args.run else work / "run"
        if not args.run:  # a finished (tiny) frozen run to predict with
            timed([PYTHON, MAIN, "--mode", "train", "--data_file", str(ROOT / "data/demo/demo_ec50_scaffold.json"),
                   "--unimol_weights", str(weights), "--cache_dir", str(work / "cache-run"), "--epochs", "1",
                   "--train_size", "20", "--val_size", "10", "--test_size", "10", "--max_heavy_atoms",
                   str(DRUG_SIZED), "--output_dir", str(run)])
        rss = {}
        pool = smiles[args.n:]
        for n in (args.predict_n, 4 * args.predict_n):
            (work / f"predict{n}.smi").write_text("".join(f"{s} m{i}\n" for i, s in enumerate(pool[:n])))
            seconds, out = timed([PYTHON, "-c", PREDICT_WITH_RSS, str(ROOT), "--chunk_rows", str(args.predict_chunk),
                                  "--mode", "predict", "--output_dir", str(run), "--input",
                                  str(work / f"predict{n}.smi"), "--cache_dir", str(work / f"cache-predict{n}"),
                                  "--output", str(work / f"predict{n}.csv")])
            rss[n] = float(out.split("peak_rss_mb")[-1])
            print(f"predict {n:6d} molecules ({args.predict_chunk}-row chunks)  {seconds:7.1f} s  "
                  f"peak RSS {rss[n]:7.0f} MB", flush=True)
    small, large = args.predict_n, 4 * args.predict_n
    print(f"featurize: 1 process with {cores} conformer workers {many / one:.2f}x of 1 process, 1 worker")
    print(f"ratio 2 processes/1 featurisation throughput: {two / one:.2f}x; predict peak RSS {rss[small]:.0f} MB "
          f"({small} molecules) vs {rss[large]:.0f} MB ({large})")

if __name__ == "__main__":
    main()
