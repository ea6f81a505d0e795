"""ECFP: RDKit's Morgan count fingerprint (radius 2, i.e. ECFP4; 2048 bits; RDKit's default ECFP atom
invariants, no chirality) of each SMILES as written, as a frozen encoder: the classic
cheminformatics control beside the pretrained ones. No weights and nothing to fine-tune; its
identity is the SHA-256 of its settings and the RDKit version (another RDKit may hash otherwise)."""
import hashlib
import json
from pathlib import Path

import rdkit
from rdkit import Chem
from rdkit.Chem import rdFingerprintGenerator

from encoders import ENCODERS, EncoderId
from encoders.base import BATCH, Encoder, as_float_array
from utils import InputError

RADIUS, BITS = 2, 2048
SETTINGS = {"fingerprint": "rdkit-morgan-count", "radius": RADIUS, "bits": BITS, "chirality": False,
            "rdkit": rdkit.__version__}


class ECFPEncoder(Encoder):
    """Frozen Morgan count fingerprints: SMILES in, (n, 2048) float32 counts out."""
    info = ENCODERS["ecfp"]

    def __init__(self):
        digest = hashlib.sha256(json.dumps(SETTINGS, sort_keys=True).encode()).hexdigest()
        super().__init__(EncoderId(self.info.name, sha256=digest))
        self.generator = rdFingerprintGenerator.GetMorganGenerator(radius=RADIUS, fpSize=BITS)

    def prepare_within(self, smiles, settings):
        """The SMILES themselves: fingerprints are computed when encoded (and cached as features)."""
        return {s: s for s in smiles}, {}

    def store_dir(self, cache_dir, what):
        return Path(cache_dir) / f"ecfp-features-{self.identity.sha256[:16]}"

    def store_meta(self, what):
        return {"kind": "ecfp-features", "encoder_weights": self.weights_id, **SETTINGS}

    def encode(self, entries, batch_size=BATCH, device="cpu"):
        rows = [self.generator.GetCountFingerprintAsNumPy(Chem.MolFromSmiles(s))[None] for s in entries]
        return as_float_array(rows, BITS)


def frozen(weights=None, amp=False):
    return ECFPEncoder()


def build(spec, weights=None, grad_checkpointing=False):
    if spec.finetune_encoder:
        raise InputError("--foundation_model ecfp is frozen only (a fingerprint has no layers to fine-tune)")
    return ECFPEncoder()
