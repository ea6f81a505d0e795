"""Wall time and peak memory of the whole frozen-vs-fine-tuned sweep (run_finetune_comparison.sh
--demo): cold caches vs warm caches (conformers, features and prefix states already on disk), at two
dataset sizes. Peak RSS is that of the largest process the sweep started.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine


# A fresh interpreter per sweep, so that RUSAGE_CHILDREN's peak is this sweep's alone.
WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def sweep(output_root, cache_dir, size, seeds, epochs):
    env = dict(os.environ, OUTPUT_ROOT=output_root, SEEDS=seeds, EPOCHS=str(epochs), TRAIN_SIZE=str(size),
               VAL_SIZE=str(size // 2), TEST_SIZE=str(size), EXTRA_ARGS=f"--cache_dir {cache_dir}")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAPPER, "bash", str(ROOT / "run_finetune_comparison.sh"), "--demo"],
                         env=env, check=True, capture_output=True, text=True, cwd=ROOT)  # as `make demo` runs it
    return time.perf_counter() - start, int(out.stdout.split()[-1]) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,200", help="TRAIN_SIZE values (VAL_SIZE = half, TEST_SIZE = same)")
    p.add_argument("--seeds", default="42 43 44")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    print(f"machine: {machine()}; seeds {args.seeds}; {args.epochs} epochs")
    print(f"{'train size':>10} {'cold s':>8} {'warm s':>8} {'cold/warm':>9} {'peak RSS MB':>11}")
    rows = []
    for size in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            cold, rss_cold = sweep(f"{tmp}/cold", f"{tmp}/cache", size, args.seeds, args.epochs)
            warm, rss_warm = sweep(f"{tmp}/warm", f"{tmp}/cache", size, args.seeds, args.epochs)
        rows.append((size, cold, warm))
        print(f"{size:>10} {cold:8.0f} {warm:8.0f} {cold / warm:8.2f}x {max(rss_cold, rss_warm):11.0f}")
    (s1, c1, w1), (s2, c2, w2) = rows[0], rows[-1]
    print(f"scaling {s1}->{s2} molecules per side: cold {c2 / c1:.2f}x time, warm {w2 / w1:.2f}x time; "
          f"warm cache saves {1 - w2 / c2:.0%} at {s2}")


if __name__ == "__main__":
    main()
