"""Energy-DPO training: pairwise loss, validation-AUROC model selection, early stopping and
resumable checkpoints."""
import csv
import dataclasses
import io
import logging
import math
import time

import torch
import torch.distributed as dist

import distributed
from batching import Subset, energies
from evaluate import ood_metrics
from model import load_checkpoint, pair_diagnostics, save_checkpoint
from utils import InputError, atomic_write_text, progress

log = logging.getLogger("energy_dpo.train")

# A frozen head's epoch takes milliseconds and a converged run hundreds of them: the log shows the first ten
# epochs, then about LOG_LINES of a long budget, and the last (history.csv has every epoch)
LOG_LINES = 100
HISTORY_COLUMNS = ["epoch", "train_loss", "misranked", "margin", "e_id", "e_ood",
                   "val_loss", "val_auroc", "val_misranked", "lr", "encoder_lr", "steps", "seconds", "encoder_weights"]


class _Gather(torch.autograd.Function):
    """All ranks' shares of n rows, joined in order, on every rank. Backward: a rank's rows get the
    sum over ranks of the gradient each rank's loss gives them."""

    @staticmethod
    def forward(ctx, local, n):
        team = distributed.current()
        ctx.n = n
        sizes = [len(range(n)[team.share(n, rank)]) for rank in range(team.size)]
        padded = local.new_zeros((max(sizes), *local.shape[1:]))  # all_gather wants equal shapes
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[distributed.current().share(ctx.n)], None


def gather_rows(local, n):
    """Differentiable: every rank's shares of n rows, in order (the rows themselves in one process)."""
    return local if distributed.current().size == 1 else _Gather.apply(local, n)


def team_energies(model, inputs, batch_size, device):
    """Energies of all of `inputs`, each rank of a torchrun team scoring its share."""
    team = distributed.current()
    if team.size == 1:
        return energies(model, inputs, batch_size, device)
    mine = torch.arange(len(inputs))[team.share(len(inputs))]
    local = energies(model, Subset(inputs, mine), batch_size, device).to(device)
    return gather_rows(local, len(inputs)).cpu()


class PairForward(torch.nn.Module):
    """Energies of an ID and an OOD batch in one forward call: DistributedDataParallel expects one
    forward per backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch_id, batch_ood):
        return self.model(batch_id), self.model(batch_ood)


def encoder_lr_factor(epoch, cfg):
    """The share of --encoder_lr used in `epoch` (1-based): linear warm-up, then constant or cosine.

    Cosine over the E − W epochs after W warm-up epochs: ½(1 + cos(π·(e − W − 1)/(E − W))), the
    full rate in the first epoch after warm-up and a small one in the last, reaching 0 where
    training ends (torch's CosineAnnealingLR with T_max = E − W, Hugging Face's cosine schedule):
    no epoch is spent at rate 0."""
    if epoch <= cfg.warmup_epochs:
        return epoch / cfg.warmup_epochs
    if cfg.lr_schedule == "cosine":
        progress_ = (epoch - cfg.warmup_epochs - 1) / max(1, cfg.epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * progress_))
    return 1.0


class EnergyDPOTrainer:
    """Trains `model` (the energy head, and the fine-tuned encoder layers if any) on ID vs
    auxiliary-OOD molecules.

    Each micro-batch pairs `batch_size` ID molecules with `batch_size` OOD molecules and applies the
    loss over all pairs; the optimizer steps every `grad_accum_steps` micro-batches. Shuffling and
    dropout are seeded from (seed, epoch), so a resumed run continues exactly as the uninterrupted
    one would have.

    Under torchrun (DistributedDataParallel) every rank draws the same micro-batches and encodes its
    share of each; the energies are gathered with their gradients so that every rank's loss covers
    all ID × OOD pairs of the step, as one process's would. Only the leader writes files.
    """

    def __init__(self, model, cfg, run_dir, checkpoint_extra=None):
        self.model = model.to(cfg.device)
        self.team = distributed.current()
        self.pairs = PairForward(self.model)
        if self.team.size > 1:
            # Every rank's loss is the whole step's: its gradient reaches each rank's share `size`
            # times (the gather's backward sums over ranks), and DDP's average divides that back out.
            self.pairs = torch.nn.parallel.DistributedDataParallel(
                self.pairs, device_ids=[self.team.local_rank] if cfg.device.startswith("cuda") else None)
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = cfg.device
        # the model's spec and the run's config travel in every checkpoint
        self.extra = {"model_spec": dataclasses.asdict(model.spec), **(checkpoint_extra or {})}
        self.optimizer = torch.optim.AdamW(self.param_groups(model, cfg), weight_decay=cfg.weight_decay)
        self.history = []
        self.best_auroc = -math.inf
        self.best_epoch = 0
        self.start_epoch = 1

    @staticmethod
    def param_groups(model, cfg):
        groups = [{"name": "head", "params": list(model.head.parameters()), "lr": cfg.lr}]
        if model.encoder is not None:
            trainable = [p for p in model.encoder.parameters() if p.requires_grad]
            groups.append({"name": "encoder", "params": trainable, "lr": cfg.encoder_lr})
        return groups

    def _checkpoint(self, epoch):
        return {"model": self.model.checkpoint_state(), "epoch": epoch, **self.extra}

    def resume(self, path):
        state = load_checkpoint(path)
        missing = [k for k in ("optimizer", "history", "best_auroc", "best_epoch", "epoch") if k not in state]
        if missing:
            raise InputError(f"{path}: incomplete ({', '.join(missing)} missing); start the run again with --overwrite")
        self.model.load_checkpoint_state(state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: its optimizer state does not fit this model ({exc}); "
                             f"start the run again with --overwrite") from None
        self.history = state["history"]
        self.best_auroc, self.best_epoch = state["best_auroc"], state["best_epoch"]
        self.start_epoch = state["epoch"] + 1
        log.info("resumed from %s after epoch %d (best val AUROC %.4f at epoch %d)",
                 path, state["epoch"], self.best_auroc, self.best_epoch)

    def _batches(self, n_id, n_ood, generator):
        bs = self.cfg.batch_size
        perm_id, perm_ood = torch.randperm(n_id, generator=generator), torch.randperm(n_ood, generator=generator)
        longest = max(n_id, n_ood)
        for start in range(0, longest, bs):
            idx = torch.arange(start, min(start + bs, longest))
            yield perm_id[idx % n_id], perm_ood[idx % n_ood]  # the shorter side cycles

    def _epoch_seed(self, epoch):
        return self.cfg.seed * 100_003 + epoch

    def _step(self):
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _share(self, idx):
        """This rank's part of a micro-batch's indices. A rank left without molecules (a last
        micro-batch smaller than the team) still runs one, with no weight in the loss, because DDP
        needs a forward and backward from every rank."""
        mine = idx[self.team.share(len(idx))]
        return (mine, len(mine)) if len(mine) else (idx[:1], 0)

    def _step_energies(self, x_id, x_ood, i_id, i_ood):
        (m_id, k_id), (m_ood, k_ood) = self._share(i_id), self._share(i_ood)
        e_id, e_ood = self.pairs(x_id.batch(m_id, self.device), x_ood.batch(m_ood, self.device))
        return gather_rows(e_id[:k_id], len(i_id)), gather_rows(e_ood[:k_ood], len(i_ood))

    def train_epoch(self, epoch, x_id, x_ood):
        cfg = self.cfg
        torch.manual_seed(self._epoch_seed(epoch) + 1_000_003 * self.team.rank)  # own dropout masks per rank
        generator = torch.Generator().manual_seed(self._epoch_seed(epoch))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums, n, steps = {"train_loss": 0.0, "misranked": 0.0, "margin": 0.0, "e_id": 0.0, "e_ood": 0.0}, 0, 0
        batches = list(self._batches(len(x_id), len(x_ood), generator))
        for i_id, i_ood in progress(batches, desc=f"epoch {epoch}", leave=False):
            e_id, e_ood = self._step_energies(x_id, x_ood, i_id, i_ood)
            loss = self.model.loss(e_id, e_ood)
            if not torch.isfinite(loss):
                raise InputError(f"non-finite training loss ({loss.item()}) at epoch {epoch}, step {n + 1}: stopped "
                                 f"before it reached the weights. {self._resume_hint(epoch)}")
            (loss / cfg.grad_accum_steps).backward()
            n += 1
            if n % cfg.grad_accum_steps == 0 or n == len(batches):
                self._step()
                steps += 1
            sums["train_loss"] += loss.item()
            for key, value in pair_diagnostics(e_id.detach(), e_ood.detach()).items():
                sums[key] += value
        return {k: v / n for k, v in sums.items()} | {"steps": steps}

    def fit(self, inputs):
        """inputs: role → FeatureInputs / ConformerInputs. Returns the per-epoch history."""
        cfg, stale = self.cfg, self.start_epoch - 1 - self.best_epoch
        log_every = max(1, cfg.epochs // LOG_LINES)
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            if cfg.patience and stale >= cfg.patience:
                break
            t0 = time.time()
            for group in self.optimizer.param_groups:
                if group["name"] == "encoder":  # the schedule is a function of the epoch: resume-safe
                    group["lr"] = cfg.encoder_lr * encoder_lr_factor(epoch, cfg)
            row = {"epoch": epoch, **self.train_epoch(epoch, inputs["id_train"], inputs["ood_train"])}
            row["steps"] += self.history[-1]["steps"] if self.history else 0  # optimizer steps so far
            row.update(self.validate(inputs["id_val"], inputs["ood_val"], epoch))
            groups = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
            row.update(lr=groups["head"], encoder_lr=groups.get("encoder", ""), seconds=time.time() - t0)
            self.history.append(row)
            if row["val_auroc"] > self.best_auroc:
                self.best_auroc, self.best_epoch, stale = row["val_auroc"], epoch, 0
                if self.team.leader:
                    save_checkpoint(self.run_dir / "best_model.pt",
                                    self._checkpoint(epoch) | {"val_auroc": row["val_auroc"]})
            else:
                stale += 1
            last = epoch == cfg.epochs or bool(cfg.patience and stale >= cfg.patience)
            if epoch <= 10 or epoch % log_every == 0 or last:
                log.info("epoch %3d  loss %.4f  misranked %.3f  margin %+.3f  E(id) %+.3f  E(ood) %+.3f  "
                         "val AUROC %.4f%s", epoch, row["train_loss"], row["misranked"], row["margin"], row["e_id"],
                         row["e_ood"], row["val_auroc"], "  *" if stale == 0 else "")
            if self.team.leader:
                self._write_history()
                save_checkpoint(self.run_dir / "last.pt", self._checkpoint(epoch) | {
                    "optimizer": self.optimizer.state_dict(), "history": self.history,
                    "best_auroc": self.best_auroc, "best_epoch": self.best_epoch})
        return self.history

    def stopping(self):
        """How the run ended (stopping_report of its history)."""
        return stopping_report(self.history, self.best_epoch, self.cfg.epochs, self.cfg.patience)

    def _resume_hint(self, epoch):
        if epoch == self.start_epoch == 1:
            return "No epoch finished; lower --lr / --encoder_lr and start again with --overwrite"
        return (f"{self.run_dir / 'last.pt'} holds epoch {epoch - 1}: --resume continues from it once the cause is "
                f"fixed, or lower --lr / --encoder_lr and start again with --overwrite")

    def validate(self, v_id, v_ood, epoch):
        e_id = team_energies(self.model, v_id, self.cfg.eval_batch_size, self.device)
        e_ood = team_energies(self.model, v_ood, self.cfg.eval_batch_size, self.device)
        if not (torch.isfinite(e_id).all() and torch.isfinite(e_ood).all()):
            raise InputError(f"non-finite validation energies after epoch {epoch}. {self._resume_hint(epoch)}")
        metrics = ood_metrics(e_id.numpy(), e_ood.numpy())
        return {"val_loss": self.model.loss(e_id, e_ood).item(), "val_auroc": metrics["auroc"],
                "val_misranked": pair_diagnostics(e_id, e_ood)["misranked"]}

    def _write_history(self):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            writer.writerow({**{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()},
                             "encoder_weights": self.model.spec.encoder_weights})
        atomic_write_text(self.run_dir / "history.csv", buf.getvalue())


# A run that ended by its epoch budget with its best epoch in the last fifth of it was still improving
LAST_PART = 0.2


def stopping_report(history, best_epoch, epochs, patience):
    """How a run ended, from its history: the optimizer steps it took, the epochs it ran, its best epoch, what
    ended it ('patience': no validation gain for `patience` epochs; 'epoch budget': its `epochs` ran out), and
    a convergence_warning when the budget ended it while it was still improving (its best epoch in the last
    fifth of the budget)."""
    run = history[-1]["epoch"] if history else 0
    report = {"optimizer_steps": history[-1]["steps"] if history else 0, "epochs_run": run, "epoch_budget": epochs,
              "best_epoch": best_epoch,
              "stopped_by": "patience" if patience and run - best_epoch >= patience else "epoch budget"}
    if report["stopped_by"] == "epoch budget" and best_epoch > epochs - max(1, math.ceil(LAST_PART * epochs)):
        report["convergence_warning"] = (
            f"still improving when stopped: the best validation AUROC came at epoch {best_epoch} of a {epochs}-epoch "
            f"budget ({report['optimizer_steps']} optimizer steps); raise --epochs until early stopping "
            f"(--patience {patience}) ends the run" if patience else
            f"still improving when stopped: the best validation AUROC came at epoch {best_epoch} of a {epochs}-epoch "
            f"budget ({report['optimizer_steps']} optimizer steps) with early stopping off (--patience 0); raise "
            f"--epochs, or let --patience end the run")
    return report


def stopping_line(report):
    """The log's words for how a run ended."""
    how = (f"early stop: no validation gain for {report['epochs_run'] - report['best_epoch']} epochs"
           if report["stopped_by"] == "patience" else f"the {report['epoch_budget']}-epoch budget ran out")
    return (f"{how} after epoch {report['epochs_run']} ({report['optimizer_steps']} optimizer steps); best epoch "
            f"{report['best_epoch']}")


def learning_warning(history, batch_size):
    """Words for an energy head that did not learn, or None: the training loss within 1% of its
    first epoch's, or ID–OOD pairs still mis-ranked about half the time. A user then knows the head
    did not train, rather than that the encoder failed."""
    first, last = history[0], history[-1]
    stalled = abs(last["train_loss"] - first["train_loss"]) <= 0.01 * abs(first["train_loss"])
    coin = abs(last["misranked"] - 0.5) < 0.05
    if not (stalled or coin):
        return None
    per_epoch = last["steps"] / len(history)
    return (f"the energy head barely learned: after {last['steps']} optimizer steps ({per_epoch:g} per epoch at "
            f"--batch_size {batch_size} per side) the training loss went {first['train_loss']:.4f} -> "
            f"{last['train_loss']:.4f} and {last['misranked']:.0%} of ID-OOD training pairs are still mis-ranked; "
            f"raise --epochs or lower --batch_size before reading these numbers as the encoder's")
