"""Several processes started by torchrun (torch.distributed, c10d rendezvous): which one this is,
its share of a list, and the collectives the pipeline needs. Without torchrun a process is a team
of one and every collective here returns at once, so single-process code paths stay as they were.

torch is imported only when a team of several processes starts: data.py imports this module and
must stay light."""
import dataclasses
import datetime
import os

# Generous: a rank waits at a barrier while the slowest rank finishes its share of conformers.
# A rank that dies does not leave the others waiting this long: torchrun stops the whole group.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)


@dataclasses.dataclass(frozen=True)
class Team:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self):
        """Rank 0: the only process that writes run folders and output files."""
        return self.rank == 0

    def share(self, n, rank=None):
        """This rank's contiguous slice of range(n) (the first n % size ranks get one more), so that
        the shares, joined in rank order, are range(n) in order."""
        rank = self.rank if rank is None else rank
        q, r = divmod(n, self.size)
        start = rank * q + min(rank, r)
        return slice(start, start + q + (rank < r))

    def barrier(self):
        if self.size > 1:
            import torch.distributed as dist  # noqa: PLC0415
            dist.barrier()

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects of our own making)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist  # noqa: PLC0415
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


_team = Team()


def current():
    return _team


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device):
    """Join the torchrun process group (gloo on CPU, nccl on GPUs); returns this process's device:
    cuda:LOCAL_RANK when `device` is cuda."""
    global _team
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    team = Team(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.startswith("cuda"):
        device = f"cuda:{team.local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    _team = team
    return device


def stop():
    """Leave the process group: from here on this process works alone (the leader finishes the run)."""
    global _team
    if _team.size > 1:
        import torch.distributed as dist  # noqa: PLC0415
        dist.destroy_process_group()
    _team = Team()
