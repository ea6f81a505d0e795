"""Running a sweep's plan (sweep_plan.py) on this machine: one run after the other, or K at once in a job
pool, each run its own main.py process (a finished run is skipped, an interrupted one resumes), then each
dataset's summary (main.py --mode compare). An interrupted sweep stops its runs gently."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runs import FINISHED
from sweep_plan import HERE, SweepError

MAIN = os.path.join(HERE, "main.py")
STOP_WAIT_S = 10  # how long an interrupted sweep waits for its runs to stop on their own


def finished(run, options):
    if os.path.isfile(os.path.join(run.folder, FINISHED)) and not options.force:
        print(f"== {run.name}: finished, skipping ({run.folder})", flush=True)
        return True
    return False


def job_env(slot, gpus, jobs):
    """(environment, note) for the run in `slot` of `jobs` at once: its JOB_GPUS entry, and with jobs > 1
    its share of the cores as OMP_NUM_THREADS (unless the caller set it). Without it every run starts a
    thread per core: on 2 cores two MiniMol fine-tuning runs at once took 72 s against 46 s one after the
    other, and 27 s with one thread each."""
    env, parts = dict(os.environ), []
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        parts.append(f"on CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
        parts.append(f"with OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    return env, "".join(" " + part for part in parts)


def stop(processes):
    """Let interrupted runs end as a stopped run should (its atomic writes cleaned up, its log complete):
    Ctrl-C reached them too, from the terminal; those still running after STOP_WAIT_S (the sweep alone
    was interrupted, or sent SIGTERM) get the interrupt now."""
    deadline = time.monotonic() + STOP_WAIT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
    for process in processes:
        process.wait()


def run_to_end(command, env=None):
    """A command's exit status; an interrupted sweep stops it gently first (stop)."""
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except BaseException:
        stop([process])
        raise


def compare(python, plan, dataset):
    return run_to_end([python, MAIN, *plan.compare_args(dataset)]) == 0


def run_serial(plan, options, python, gpus):
    """One run after the other, each one's output on the console; each dataset's summary after its runs."""
    env, note = job_env(0, gpus, 1)
    for dataset in plan.datasets:
        for run in (r for r in plan.runs if r.dataset == dataset):
            if finished(run, options):
                continue
            print(f"== {run.name} -> {run.folder}{note}", flush=True)
            if run_to_end([python, MAIN, *run.args], env) != 0:
                raise SweepError(f"run failed: {run.name} (log: {run.folder}/training.log); sweep stopped", status=1)
        if not compare(python, plan, dataset):
            raise SweepError(f"the summary of {dataset} failed", status=1)


def run_pool(plan, options, python, gpus):
    """Up to options.jobs runs at once, each in a slot 0..K-1 (its JOB_GPUS entry), its output in
    RUN/sweep_console.log; a dataset's summary once all its runs have ended. The first failed run stops
    the launching: the running ones are waited for, the failed ones named."""
    running, failed, free, summarized = {}, [], list(range(options.jobs)), set()
    left = {dataset: sum(r.dataset == dataset for r in plan.runs) for dataset in plan.datasets}

    def summarize(dataset):
        if left[dataset] == 0 and not failed and dataset not in summarized:
            summarized.add(dataset)
            print(f"== {dataset}: all runs finished; writing the summary", flush=True)
            if not compare(python, plan, dataset):
                print(f"error: the summary of {dataset} failed", file=sys.stderr, flush=True)
                failed.append(f"the summary of {dataset}")

    def reap():
        while True:
            ended = [p for p in running if p.poll() is not None]
            if ended:
                break
            time.sleep(0.2)
        for process in ended:
            run, slot, started = running.pop(process)
            if process.returncode == 0:
                print(f"== {run.name}: finished in {round(time.monotonic() - started)} s", flush=True)
            else:
                print(f"error: run failed (exit {process.returncode}): {run.name} (output: "
                      f"{run.folder}/sweep_console.log, log: {run.folder}/training.log)", file=sys.stderr, flush=True)
                failed.append(run.name)
            free.append(slot)
            left[run.dataset] -= 1
            summarize(run.dataset)

    try:
        for dataset in plan.datasets:
            for run in (r for r in plan.runs if r.dataset == dataset):
                if failed:
                    break
                if finished(run, options):
                    left[dataset] -= 1
                    continue
                while not free:
                    reap()
                if failed:
                    break
                slot = free.pop(0)
                try:
                    Path(run.folder).mkdir(parents=True, exist_ok=True)
                except OSError:
                    print(f"error: run failed: {run.name}: cannot create the folder {run.folder}", file=sys.stderr)
                    failed.append(run.name)
                    free.append(slot)
                    break
                env, note = job_env(slot, gpus, options.jobs)
                with open(os.path.join(run.folder, "sweep_console.log"), "w") as log:
                    process = subprocess.Popen([python, MAIN, *run.args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
                running[process] = (run, slot, time.monotonic())
                print(f"== {run.name} -> {run.folder} (started{note}; output in {run.folder}/sweep_console.log)",
                      flush=True)
            if failed:
                break
            summarize(dataset)
        if failed and running:
            print(f"== a run failed: launching no more; waiting for the {len(running)} running run(s)", file=sys.stderr,
                  flush=True)
        while running:
            reap()
    finally:  # an interrupted sweep stops its runs; the next sweep resumes or restarts them
        if running:
            print(f"== stopping {len(running)} running run(s) (the next sweep resumes or restarts them): "
                  f"{' '.join(run.folder for run, _, _ in running.values())}", file=sys.stderr, flush=True)
            stop(list(running))
    if failed:
        raise SweepError(f"sweep stopped; failed: {'; '.join(failed)} (finished runs are kept; the next sweep resumes "
                         f"the rest)", status=1)
