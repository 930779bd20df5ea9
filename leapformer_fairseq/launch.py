"""Data-parallel training on one machine: N fairseq-train processes joined by torch.distributed,
each computing the gradients of its share of every update's batches.

    python -m leapformer_fairseq.launch --nproc 2 -- DATA --user-dir leapformer_fairseq ... --cpu

Rank i runs ``fairseq-train ARGS --distributed-world-size N --distributed-rank i
--distributed-init-method tcp://127.0.0.1:PORT --distributed-no-spawn``; with ``--cpu`` also
``--distributed-backend gloo --ddp-backend legacy_ddp``, else ``--device-id i`` (one GPU per
rank, nccl). N processes train the model that one process trains with ``--update-freq N``: rank
i takes batches i, i + N, ... of the same shuffled order, and the gradients are summed.

This launcher exists for the CPU: fairseq-train spawns one process per CUDA device by itself
(``--distributed-world-size N`` on a machine with N GPUs), and under torchrun it divides by the
CUDA device count, which is 0 on the CPU; PyTorch's DistributedDataParallel takes no device ids
for CPU modules, which fairseq passes, hence fairseq's own ``legacy_ddp`` there.
"""
import argparse
import socket
import subprocess
import sys
import time
from typing import List, Optional, Sequence

FAIRSEQ_TRAIN = [sys.executable, "-m", "fairseq_cli.train"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_commands(train_args: Sequence[str], nproc: int, port: int) -> List[List[str]]:
    """The fairseq-train command of each rank."""
    cpu = "--cpu" in train_args
    commands = []
    for rank in range(nproc):
        command = [*FAIRSEQ_TRAIN, *train_args, "--distributed-world-size", str(nproc),
                   "--distributed-rank", str(rank), "--distributed-init-method",
                   f"tcp://127.0.0.1:{port}", "--distributed-no-spawn"]
        if cpu:
            command += ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
        else:
            command += ["--device-id", str(rank)]
        commands.append(command)
    return commands


def run(commands: Sequence[Sequence[str]]) -> None:
    """Start every rank; wait for all. The first rank to fail stops the others, and the
    launcher exits naming it."""
    processes = [subprocess.Popen(command) for command in commands]
    try:
        while any(process.poll() is None for process in processes):
            failed = [rank for rank, process in enumerate(processes)
                      if process.returncode not in (None, 0)]
            if failed:
                raise SystemExit(f"[launch] rank {failed[0]} failed (exit code "
                                 f"{processes[failed[0]].returncode}); stopped the others")
            time.sleep(0.2)
        failed = [rank for rank, process in enumerate(processes) if process.returncode != 0]
        if failed:
            raise SystemExit(f"[launch] rank {failed[0]} failed (exit code "
                             f"{processes[failed[0]].returncode})")
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, required=True, help="processes (ranks), >= 2")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port of the rendezvous on 127.0.0.1 (default: a free one)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after --: fairseq-train's arguments, as for one process")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.nproc < 2:
        raise SystemExit(f"[launch] --nproc {args.nproc}: use fairseq-train itself for one "
                         "process")
    if not train_args:
        raise SystemExit("[launch] no fairseq-train arguments after --")
    for flag in ("--distributed-world-size", "--distributed-rank", "--distributed-init-method"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in train_args):
            raise SystemExit(f"[launch] {flag} is set by the launcher; leave it out")
    run(rank_commands(train_args, args.nproc, args.port or free_port()))


if __name__ == "__main__":
    main()
