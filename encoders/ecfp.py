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
from encoders.base import EncoderModule, as_float_array

RADIUS, BITS = 2, 2048
SETTINGS = {"fingerprint": "rdkit-morgan-count", "radius": RADIUS, "bits": BITS, "chirality": False,
            "rdkit": rdkit.__version__}


class ECFPEncoder(EncoderModule):
    """Frozen Morgan count fingerprints: SMILES in, (n, 2048) float32 counts out, computed in this process
    on the CPU (so it takes no --num_workers or --encode_batch_size; --device places the energy head)."""
    info = ENCODERS["ecfp"]

    def __init__(self):
        digest = hashlib.sha256(json.dumps(SETTINGS, sort_keys=True).encode()).hexdigest()
        super().__init__(EncoderId(self.info.name, sha256=digest))
        self.generator = rdFingerprintGenerator.GetMorganGenerator(radius=RADIUS, fpSize=BITS)

    def prepare_within(self, smiles, settings):
        """The SMILES themselves: fingerprints are computed when encoded (and cached as features)."""
        return {s: s for s in smiles}, {}

    def input_report(self, prepared, smiles):
        return {}  # a SMILES that parses has its fingerprint: nothing to report

    def store_dir(self, cache_dir, what):
        return Path(cache_dir) / f"ecfp-features-{self.identity.sha256[:16]}"

    def store_meta(self, what):
        return {"kind": "ecfp-features", "encoder_weights": self.weights_id, **SETTINGS}

    def encode(self, entries, batch_size=None, device=None):
        rows = [self.generator.GetCountFingerprintAsNumPy(Chem.MolFromSmiles(s))[None] for s in entries]
        return as_float_array(rows, BITS)


def build(spec):
    return ECFPEncoder()  # frozen only: build_encoder refuses a fine-tuned spec for it
