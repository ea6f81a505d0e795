"""The command line's entry point (usage: README.md, docs/cli.md): the flags become a checked command
(cli.py), which runs as its mode's steps (pipeline.py, predict.py). torch, scikit-learn and matplotlib
load only when a mode runs; nothing imports this file."""
import importlib
import sys

import distributed
from cli import UsageError, parse
from utils import InputError, setup_logging

# Each mode's runner: (module, function), called with the command's typed settings (cli.Command.jobs)
RUNNERS = {"train": ("pipeline", "run_train"), "eval": ("pipeline", "run_eval"), "predict": ("predict", "run_predict"),
           "featurize": ("pipeline", "run_featurize"), "prepare": ("pipeline", "run_prepare"),
           "compare": ("pipeline", "run_compare"), "analyze": ("pipeline", "run_analyze")}


def fetch(command):
    """Download the weights the command asks for (--mode weights, --<weights flag> download) into their
    default place: {flag: path}."""
    if not command.fetch:
        return {}
    import download  # noqa: PLC0415 - huggingface_hub: only when weights are fetched
    fetched = {}
    for weights in command.fetch:
        fetched[weights.flag] = str(download.download_weights(weights, weights.default_path()))
        print(f"{fetched[weights.flag]}: the hub's {weights.file}, SHA-256 checked", file=sys.stderr)
    return fetched


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        command = parse(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = distributed.start(command.device) if distributed.launched_by_torchrun() else command.device
    setup_logging(hold=command.logged)
    try:
        fetched = fetch(command)
        if command.mode != "weights":
            module, runner = RUNNERS[command.mode]  # the heavy modules load here, not at import
            getattr(importlib.import_module(module), runner)(*command.jobs(device, fetched))
    except InputError as exc:
        if distributed.current().leader:  # a torchrun team stops together; one of them says why
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a read-only folder, a path that is a file...: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (nothing was left half-written)", file=sys.stderr)
        return 1
    finally:
        distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
