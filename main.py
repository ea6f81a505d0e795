"""Energy-DPO OOD detection on Uni-Mol features: command-line entry point.

    python main.py --mode train --data_file data/demo/demo_ec50_scaffold.json --unimol_weights random
    python main.py --mode eval --output_dir outputs/<run>
    python main.py --mode predict --output_dir outputs/<run> --input mols.smi --output scores.csv
    python main.py --mode featurize --input mols.smi --output feats.npy
    python main.py --mode train --finetune_encoder --freeze_layers 0-12 --encoder_lr 5e-6
    python main.py --mode compare --output_dir outputs/finetune_comparison/<dataset>
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from data import (InputError, atomic_write_json, conformers_for_inputs, load_benchmark, missing_data_file,
                  read_smiles_file)
from evaluate import RANDOM_INIT_LABEL, evaluate_run, plot_training_curves, write_comparison, write_scores_csv
from model import (EnergyDPOModel, FinetunableUniMolEncoder, UniMolEncoder, default_weights_path, energies,
                   load_best_model, missing_weights, parse_freeze_spec, role_inputs, UNIMOL_LAYERS)
from train import EnergyDPOTrainer, check_resumable, prepare_run_dir, run_config, RUNTIME_FLAGS

log = logging.getLogger("energy_dpo")
FROZEN_BATCH_SIZE, FROZEN_EVAL_BATCH_SIZE = 4096, 2048
FINETUNE_BATCH_SIZE, FINETUNE_EVAL_BATCH_SIZE = 256, 512


def build_parser():
    p = argparse.ArgumentParser(description="Energy-DPO out-of-distribution detection on the Uni-Mol encoder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["train", "eval", "predict", "featurize", "compare"], default="train",
                   help="compare: summarise a frozen-vs-fine-tuned sweep under --output_dir")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="lbap_general_ec50_scaffold", help="name; also picks data/raw/<dataset>.json")
    g.add_argument("--data_file", help="DrugOOD JSON (default: ./data/raw/<dataset>.json)")
    g.add_argument("--train_size", type=int, default=2000, help="molecules per side (ID and OOD) for training")
    g.add_argument("--val_size", type=int, default=600, help="molecules per side for validation")
    g.add_argument("--test_size", type=int, default=1000, help="molecules per side for testing")
    g.add_argument("--data_seed", type=int, default=42, help="seed of the subsampling, independent of --seed")
    g.add_argument("--cache_dir", default="./cache", help="conformer and feature caches")
    g.add_argument("--force_recompute_cache", action="store_true", help="drop and rebuild the caches used")
    g.add_argument("--num_workers", type=int, default=2, help="processes for conformer generation")
    g = p.add_argument_group("encoder")
    g.add_argument("--foundation_model", choices=["unimol"], default="unimol")
    g.add_argument("--unimol_weights", default=None,
                   help=f"checkpoint path, or 'random' for a seeded random-init encoder (default: "
                        f"$UNIMOL_WEIGHT_DIR/mol_pre_no_h_220816.pt if set, else {default_weights_path()}; "
                        f"eval/predict: the run's own)")
    g.add_argument("--encode_batch_size", type=int, default=64, help="molecules per frozen Uni-Mol forward pass")
    g.add_argument("--amp", choices=["off", "bf16"], default="off", help="bf16 autocast of the Uni-Mol forward")
    g = p.add_argument_group("fine-tuning the encoder")
    g.add_argument("--finetune_encoder", action="store_true", help="train part of Uni-Mol with the head")
    g.add_argument("--encoder_lr", type=float, default=5e-6, help="learning rate of the encoder parameters")
    g.add_argument("--freeze_layers", default="0-12",
                   help="frozen transformer layers: ranges and lists (0-12, 0-5,7,9-12), none, all")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute trainable layers in backward")
    g = p.add_argument_group("energy head and loss")
    g.add_argument("--hidden_dim", type=int, default=256)
    g.add_argument("--loss_type", choices=["dpo", "bce", "mse", "hinge"], default="dpo")
    g.add_argument("--dpo_beta", type=float, default=0.1)
    g.add_argument("--lambda_reg", type=float, default=0.01, help="weight of the energy-magnitude penalty")
    g.add_argument("--hinge_margin", type=float, default=1.0)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch_size", type=int, default=None,
                   help=f"per side (default {FROZEN_BATCH_SIZE}; {FINETUNE_BATCH_SIZE} when fine-tuning)")
    g.add_argument("--eval_batch_size", type=int, default=None,
                   help=f"default {FROZEN_EVAL_BATCH_SIZE}; {FINETUNE_EVAL_BATCH_SIZE} when fine-tuning")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight_decay", type=float, default=1e-5)
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--patience", type=int, default=20, help="epochs without validation gain before stopping; 0 = off")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("runs")
    g.add_argument("--output_dir", help="run directory (default: outputs/<dataset>/unimol_<loss>_seed<seed>)")
    g.add_argument("--model_path", help="eval/predict: a best_model.pt (its folder is the run)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or started run / output file")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g = p.add_argument_group("predict / featurize")
    g.add_argument("--input", help=".smi (first column) or .csv (a 'smiles' column)")
    g.add_argument("--smiles", nargs="+", help="SMILES given on the command line")
    g.add_argument("--output", help="predict: CSV to write; featurize: .npy to write")
    return p


def validate_args(args):
    """Resolve defaults and reject inconsistent flags; returns an error message or None."""
    for name in ("epochs", "train_size", "val_size", "test_size", "encode_batch_size", "grad_accum_steps"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1"
    for name in ("batch_size", "eval_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be at least 1"
    if args.hidden_dim < 2:
        return "--hidden_dim must be at least 2 (the head halves it)"
    if args.lr <= 0 or args.encoder_lr <= 0 or args.dpo_beta <= 0 or args.grad_clip <= 0:
        return "--lr, --encoder_lr, --dpo_beta and --grad_clip must be positive"
    try:
        frozen = parse_freeze_spec(args.freeze_layers)
    except ValueError as exc:
        return str(exc)
    if args.finetune_encoder and args.foundation_model != "unimol":
        return f"--finetune_encoder works with --foundation_model unimol only, not {args.foundation_model}"
    if args.finetune_encoder and len(frozen) == UNIMOL_LAYERS:
        return f"--freeze_layers {args.freeze_layers} leaves no Uni-Mol layer to fine-tune"
    if args.lambda_reg < 0 or args.weight_decay < 0 or args.patience < 0 or args.num_workers < 0:
        return "--lambda_reg, --weight_decay, --patience and --num_workers cannot be negative"
    if args.resume and args.overwrite:
        return "--resume and --overwrite contradict each other"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {args.device}: CUDA is not available on this machine (use --device cpu)"
    elif args.device != "cpu" and not args.device.startswith("cuda"):
        return f"--device {args.device}: expected auto, cpu, cuda or cuda:N"
    if args.mode == "compare" and not args.output_dir:
        return "--mode compare needs --output_dir SWEEP/<dataset> (holding frozen/seed*/ and finetuned/seed*/)"
    if args.mode in ("eval", "predict") and not (args.output_dir or args.model_path):
        return f"--mode {args.mode} needs --output_dir RUN or --model_path RUN/best_model.pt"
    if args.mode in ("predict", "featurize"):
        if bool(args.input) == bool(args.smiles):
            return f"--mode {args.mode} needs exactly one of --input FILE or --smiles ..."
        if not args.output:
            return f"--mode {args.mode} needs --output"
        if Path(args.output).exists() and not args.overwrite:
            return f"{args.output} exists; pass --overwrite to replace it"
    args.data_file = args.data_file or f"./data/raw/{args.dataset}.json"
    batch, eval_batch = ((FINETUNE_BATCH_SIZE, FINETUNE_EVAL_BATCH_SIZE) if args.finetune_encoder
                         else (FROZEN_BATCH_SIZE, FROZEN_EVAL_BATCH_SIZE))
    args.batch_size = args.batch_size or batch
    args.eval_batch_size = args.eval_batch_size or eval_batch
    if args.mode in ("train", "featurize"):
        args.unimol_weights = args.unimol_weights or default_weights_path()
    if args.mode == "train":
        args.output_dir = args.output_dir or f"outputs/{args.dataset}/unimol_{args.loss_type}_seed{args.seed}"
        if not Path(args.data_file).is_file():
            return missing_data_file(args.data_file)
    if args.unimol_weights not in (None, "random") and not Path(args.unimol_weights).is_file():
        return missing_weights(args.unimol_weights)
    return None


def setup_logging(log_file=None):
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
    for handler in [logging.StreamHandler(sys.stderr)] + ([logging.FileHandler(log_file)] if log_file else []):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def encoder_label(encoder):
    return RANDOM_INIT_LABEL if encoder.is_random_init else f"Uni-Mol weights {encoder.weights_id}"


def build_encoder(args):
    """The frozen encoder, or with --finetune_encoder its own partly trainable Uni-Mol instance."""
    if not args.finetune_encoder:
        return UniMolEncoder(args.unimol_weights, amp=args.amp == "bf16")
    return FinetunableUniMolEncoder(args.unimol_weights, parse_freeze_spec(args.freeze_layers),
                                    amp=args.amp == "bf16", grad_checkpointing=args.grad_checkpointing)


def build_model(args, encoder):
    torch.manual_seed(args.seed)
    return EnergyDPOModel(hidden_dim=args.hidden_dim, loss_type=args.loss_type, beta=args.dpo_beta,
                          lambda_reg=args.lambda_reg, margin=args.hinge_margin,
                          encoder=encoder if args.finetune_encoder else None)


def benchmark_inputs(args, encoder, run_dir):
    roles, conformers, report = load_benchmark(args.data_file, (args.train_size, args.val_size, args.test_size),
                                               args.data_seed, args.cache_dir, args.num_workers,
                                               args.force_recompute_cache)
    atomic_write_json(run_dir / "data_report.json", report)
    log.info("roles: %s; %d items skipped (see data_report.json)",
             ", ".join(f"{r} {len(m)}" for r, m in roles.items()), len(report["skipped"]))
    return roles, role_inputs(encoder, roles, conformers, args)


def report_metrics(metrics, args, encoder):
    print(f"\n{args.dataset} test ({encoder_label(encoder)}): AUROC {metrics['auroc']:.4f}  "
          f"AUPR {metrics['aupr']:.4f}  AUPR-In {metrics['aupr_in']:.4f}  FPR95 {metrics['fpr95']:.4f}  "
          f"(ID {metrics['n_id']}, OOD {metrics['n_ood']}, best epoch {metrics['best_epoch']})")


def run_train(args):
    run_dir = Path(args.output_dir)
    prepare_run_dir(run_dir, args.overwrite, args.resume)
    setup_logging(run_dir / "training.log")
    encoder = build_encoder(args)
    config = run_config(args, encoder)
    log.info("configuration: %s", json.dumps(config, indent=1))
    if args.finetune_encoder:
        trainable, total = config["encoder_trainable_params"], config["encoder_total_params"]
        log.info("fine-tuning %s of %s Uni-Mol parameters (%.1f%%), frozen layers %s",
                 f"{trainable:,}", f"{total:,}", 100 * trainable / total, args.freeze_layers)
    if encoder.is_random_init:
        log.warning("%s: numbers from this run are not Uni-Mol results", RANDOM_INIT_LABEL)
    if args.resume:
        check_resumable(run_dir, config)
    else:
        atomic_write_json(run_dir / "config.json", config)
    roles, inputs = benchmark_inputs(args, encoder, run_dir)
    net = build_model(args, encoder)
    trainer = EnergyDPOTrainer(net, args, run_dir, args.device,
                               {"config": config, "encoder_weights": encoder.weights_id})
    if args.resume:
        trainer.resume(run_dir / "last.pt")
    title = f"{args.dataset} · {encoder_label(encoder)}"
    plot_training_curves(run_dir / "training_curves.png", trainer.fit(inputs), title)
    metrics = evaluate_run(run_dir / "best_model.pt", net, inputs, roles, encoder, args,
                           {"dataset": args.dataset, "title": title})
    report_metrics(metrics, args, encoder)


def load_run(args):
    """The run directory, its checkpoint and its training flags (runtime flags from this command)."""
    ckpt = Path(args.model_path) if args.model_path else Path(args.output_dir) / "best_model.pt"
    config_path = ckpt.parent / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path}: not found; --output_dir / --model_path must point at a training run")
    stored = json.loads(config_path.read_text())["args"]
    run_args = argparse.Namespace(**{**stored, **{k: getattr(args, k) for k in RUNTIME_FLAGS}})
    run_args.unimol_weights = args.unimol_weights or stored["unimol_weights"]
    return ckpt.parent, ckpt, run_args


def run_eval(args):
    run_dir, ckpt, run_args = load_run(args)
    setup_logging(run_dir / "eval.log")
    encoder = build_encoder(run_args)
    roles, inputs = benchmark_inputs(run_args, encoder, run_dir)
    metrics = evaluate_run(ckpt, build_model(run_args, encoder), inputs, roles, encoder, run_args,
                           {"dataset": run_args.dataset, "title": f"{run_args.dataset} · {encoder_label(encoder)}"})
    report_metrics(metrics, run_args, encoder)


def input_molecules(args, encoder, run_args):
    """The user's SMILES as model inputs: (inputs, {row: canonical}, model inputs, {row: reason})."""
    smiles = args.smiles or read_smiles_file(args.input)
    if not smiles:
        raise InputError(f"{args.input}: no SMILES found")
    canon, conformers, failed = conformers_for_inputs(smiles, run_args.cache_dir, run_args.num_workers,
                                                      run_args.force_recompute_cache)
    inputs = role_inputs(encoder, {"input": list(canon.values())}, conformers, run_args)["input"]
    if failed:
        log.warning("%d of %d molecules could not be featurised (listed in the output)", len(failed), len(smiles))
    return smiles, canon, inputs, failed


def run_predict(args):
    setup_logging()
    run_dir, ckpt, run_args = load_run(args)
    metrics_path = run_dir / "test_metrics.json"
    if not metrics_path.is_file():
        raise InputError(f"{metrics_path}: missing; the run has not finished (its OOD threshold is set at the end)")
    threshold = json.loads(metrics_path.read_text())["threshold_95_id_val"]
    encoder = build_encoder(run_args)
    net = build_model(run_args, encoder)
    load_best_model(net, ckpt, encoder.weights_id)
    smiles, canon, inputs, failed = input_molecules(args, encoder, run_args)
    scores = dict(zip(canon, energies(net.to(run_args.device), inputs, run_args.eval_batch_size,
                                      run_args.device).numpy())) if canon else {}
    rows = [(s, canon[i], f"{scores[i]:.6f}", int(scores[i] > threshold), "") if i in scores
            else (s, "", "", "", failed[i]) for i, s in enumerate(smiles)]
    write_scores_csv(Path(args.output), rows, ["smiles", "canonical_smiles", "energy", "is_ood", "error"])
    print(f"wrote {args.output}: {len(scores)} scored ({sum(r[3] == 1 for r in rows)} flagged OOD at energy > "
          f"{threshold:.4f}, the 95th percentile of validation ID), {len(failed)} failed; encoder "
          f"{encoder_label(encoder)}")


def run_featurize(args):
    setup_logging()
    encoder = UniMolEncoder(args.unimol_weights, amp=args.amp == "bf16")
    smiles, canon, inputs, failed = input_molecules(args, encoder, args)
    feats = inputs.features.numpy()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npy")
    np.save(tmp, feats.astype(np.float32))
    tmp.replace(out)
    write_scores_csv(out.with_suffix(".rows.csv"), [(row, i, smiles[i], c) for row, (i, c) in enumerate(canon.items())],
                     ["npy_row", "input_row", "smiles", "canonical_smiles"])
    write_scores_csv(out.with_suffix(".failed.csv"), [(i, smiles[i], r) for i, r in sorted(failed.items())],
                     ["input_row", "smiles", "reason"])
    print(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]}, encoder {encoder_label(encoder)}); "
          f"{len(failed)} failed rows in {out.with_suffix('.failed.csv')}")


def run_compare(args):
    _, text = write_comparison(args.output_dir)
    print(text)


MODES = {"train": run_train, "eval": run_eval, "predict": run_predict, "featurize": run_featurize,
         "compare": run_compare}


def main(argv=None):
    args = build_parser().parse_args(argv)
    error = validate_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        MODES[args.mode](args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
