"""Shared set-up for the bench scripts: the repo on sys.path, demo molecules, random checkpoints."""
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from encoders.unimol import build_unimol  # noqa: E402
from molecules import canonicalize  # noqa: E402

DEMO = ROOT / "data" / "demo" / "demo_ec50_scaffold.json"


def demo_molecules(n, seed=0, split=None):
    """n distinct molecules drawn at random from the demo benchmark (all splits, or one), as the file
    writes their SMILES (both sides of a comparison then make conformers from the same strings)."""
    doc = json.loads(DEMO.read_text())["split"]
    items = doc[split] if split else [it for s in doc.values() for it in s]
    unique = list({canonicalize(it["smiles"].strip())[0]: it["smiles"].strip() for it in reversed(items)}.values())
    unique.reverse()  # the first writing of each molecule, in file order
    pick = np.random.default_rng(seed).choice(len(unique), min(n, len(unique)), replace=False)
    return [unique[i] for i in sorted(pick)]


def random_checkpoint(path, init_seed):
    """A random-init Uni-Mol saved in the official {'model': state_dict} layout."""
    torch.save({"model": build_unimol(init_seed=init_seed).state_dict()}, path)
    return path


def peak_rss_mb(children=False):
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def machine():
    import os
    import platform
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def isolated(script, **flags):
    """Run `script --flag value ...` in a fresh interpreter, so that its peak memory is its own; its
    last line of output is a JSON object."""
    command = [sys.executable, str(script)] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
