"""Distributed calibration: shard the calibration windows across processes with torch.distributed.

    torchrun --nproc-per-node 2 -m prunekit prune MODEL --method sparsegpt --sparsity 0.5 ...
    prunekit prune MODEL --method sparsegpt --sparsity 0.5 --nproc 2 ...      (the same, launched for you)

Every process loads the model and tokenizes the same (seeded) calibration windows, then keeps its
own contiguous share of them (`shard`). The engine runs unchanged on that share: each process
feeds its windows through the current block and accumulates its observers (input norms,
Hessians, means/variances). Right before a group of layers is pruned, the observers are summed
across processes (`reduce_stats_`): every accumulator is a sum over calibration tokens, so the
summed observer is the one a single process would have built from all windows. The sums are
float64 (`stats`), so adding them in another order moves them by ~1e-16 relative, and the float32
statistics the methods read (rounded once from them) come out bit-identical: even SparseGPT, whose
OBS sweep amplifies last-bit differences, gives the 1-process weights. Every process then computes the same pruned
weights from the same statistics; rank 0's are broadcast anyway (`broadcast_`), so the processes
can never drift apart, and each propagates its own windows through the pruned block.

This is data parallelism over calibration windows (no model sharding): each process holds the
model (on CPU) and one block on its compute device, so memory per process is that of a
single-process run with 1/N of the cached activations, and observing costs 1/N of the time.
What is not split: capture, the pruning math itself, and perplexity (rank 0 evaluates; the others
wait). The reconstruction errors in the report add every process's probe rows.

Backends: `gloo` on CPU, `nccl` when the compute device is CUDA (each process then uses
cuda:LOCAL_RANK). Several machines: the standard torchrun rendezvous, with the model, data and
package versions present on every node (see docs/distributed.md):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m prunekit prune MODEL --method wanda --sparsity 0.5 --device cuda --out OUT

Deadlock freedom: every collective here is issued by every process in the same order, because
every process walks the same blocks and the same groups in the same order (the observation
order inside a block is fixed by the model, not by the data), and the scalar collectives of the
other passes (`offset` when a block pass starts, `all_sum` of a search's losses) sit where every
process arrives with the same configuration. In true-sequential mode the group
is pruned by the last of the process's lockstep threads to reach it (`lockstep.Lockstep`), so
exactly one thread per process issues each collective, and the others wait for it.
"""
from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys

import torch
from torch import Tensor

TIMEOUT = datetime.timedelta(minutes=60)   # rank 0 evaluates and exports while the others wait


def _dist():
    import torch.distributed as dist   # lazily: `import prunekit` never touches the distributed runtime
    return dist


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1).

    Returns the compute device this process should use: `device` unchanged on CPU or in a single
    process, cuda:LOCAL_RANK when a multi-process run asks for CUDA. A no-op when WORLD_SIZE is
    unset or 1, or when the group is already initialized (a Python user did it).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return device
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                           "run a single process (without torchrun / --nproc)")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible; "
                               "lower --nproc-per-node to the number of GPUs on this node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    available = dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()
    if not available:
        raise RuntimeError(f"the {backend} backend is not available in this torch build; "
                           + ("use --device cpu (gloo) or a CUDA build of torch with NCCL" if backend == "nccl"
                              else "install a torch build with gloo (the standard wheels have it)"))
    # with NCCL, gloo as well for CPU tensors (the scalar sums of `all_sum`, `offset`)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if backend == "nccl" else backend, timeout=TIMEOUT)
    return device


def finish() -> None:
    """Wait for every process, then leave the group (the end of a distributed run)."""
    if is_distributed():
        barrier()
        _dist().destroy_process_group()


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def shard(calib: Tensor | None, batch_size: int, *, rank_: int | None = None,
          world: int | None = None) -> Tensor | None:
    """This process's calibration windows: a contiguous run of whole `batch_size` chunks.

    Splitting at chunk boundaries keeps every chunk exactly as the single-process run forms it,
    so each window's activations are computed in the same batch and bitwise equal; every window
    lands on exactly one process. Chunks are spread as evenly as possible (the first processes
    take one more when they do not divide).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if calib is None or world == 1:
        return calib
    first, stop = chunk_range(calib.shape[0], batch_size, rank_, world)
    return calib[first * batch_size:stop * batch_size]


def chunk_range(windows: int, batch_size: int, rank_: int, world: int) -> tuple[int, int]:
    """[first, stop) chunk indices of process `rank_`; raises if a process would get none."""
    chunks = math.ceil(windows / batch_size)
    if chunks < world:
        raise ValueError(f"{windows} calibration windows make {chunks} chunk(s) of batch_size {batch_size}, fewer "
                         f"than the {world} processes; use more --samples, a smaller batch "
                         f"(--set calibration.batch_size={max(1, windows // world)}) or fewer processes")
    per, extra = divmod(chunks, world)
    first = rank_ * per + min(rank_, extra)
    return first, first + per + (1 if rank_ < extra else 0)


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` over every process, in place, accumulating in float64 (the observers' sums
    are float64 already; anything narrower would otherwise take a rounding step per process)."""
    if not is_distributed():
        return tensor
    wide = tensor.to(torch.float64) if tensor.is_floating_point() else tensor.to(torch.int64)
    _dist().all_reduce(wide)
    tensor.copy_(wide)
    return tensor


def reduce_stats_(stats) -> None:
    """Sum an observer's accumulators over every process (see `stats.Observer.SUMS`): afterwards
    it equals the observer of a single process that saw every window. No-op in one process."""
    if stats is None or not is_distributed():
        return
    names = getattr(stats, "SUMS", None)
    if names is None:
        raise TypeError(f"{type(stats).__name__} does not declare its accumulators (SUMS), so it cannot be "
                        "combined across processes; run this method in a single process")
    for name in names:
        all_reduce_sum_(getattr(stats, name))
    first = getattr(stats, names[0])
    tokens = torch.tensor([stats.tokens], dtype=torch.int64, device=first.device)
    stats.tokens = int(all_reduce_sum_(tokens).item())
    if hasattr(stats, "sums_changed"):
        stats.sums_changed()            # cached float32 copies / factorisations of the local sums are stale


def all_sum(*values: float) -> list[float]:
    """Each value summed over every process (in float64): totals that each process accumulated
    over its own windows (losses, similarities, output changes). The values in one process."""
    if not is_distributed():
        return [float(v) for v in values]
    return all_reduce_sum_(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()


def global_mean(total: float, count: int) -> float:
    """total / count over every process's (total, count): the mean of a per-token measurement
    that each process summed over its own windows (depth scores). Plain division in one process."""
    total, count = all_sum(total, count)
    return total / count


def offset(count: int) -> int:
    """The sum of `count` over the processes before this one: where this process's share starts
    in the global numbering of calibration windows (or chunks), when `count` is the size of its
    share. Every process must call it at the same point (it is a collective); 0 in one process."""
    if not is_distributed():
        return 0
    counts = torch.zeros(world_size(), dtype=torch.int64)
    counts[rank()] = int(count)
    return int(all_reduce_sum_(counts)[:rank()].sum())


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` with process `src`'s copy (pruned weights: every process keeps rank 0's)."""
    if is_distributed():
        if tensor.is_contiguous():
            _dist().broadcast(tensor, src)
        else:                               # a transposed view (GPT-2's Conv1D): collectives need contiguous memory
            staging = tensor.contiguous()
            _dist().broadcast(staging, src)
            tensor.copy_(staging)
    return tensor


def broadcast_object(value):
    """Rank 0's `value` (any picklable object made by us, e.g. a path) on every process."""
    if not is_distributed():
        return value
    box = [value]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def refuse(what: str) -> None:
    """Raise a clear error for a feature whose statistics are not combined across processes."""
    if is_distributed():
        raise ValueError(f"{what} is not supported with distributed calibration yet (its statistics are not "
                         f"combined across processes); run it in a single process (without torchrun / --nproc)")


def strip_nproc(argv: list[str]) -> tuple[list[str], int | None]:
    """(argv without `--nproc N` / `--nproc=N`, N or None)."""
    out, nproc, skip = [], None, False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            if index + 1 >= len(argv):
                raise ValueError("--nproc needs a number of processes, e.g. --nproc 2")
            nproc, skip = argv[index + 1], True
        elif arg.startswith("--nproc="):
            nproc = arg.split("=", 1)[1]
        else:
            out.append(arg)
    if nproc is None:
        return out, None
    if not str(nproc).isdigit() or int(nproc) < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    return out, int(nproc)


def launch(argv: list[str], nproc: int) -> int:
    """Run `prunekit <argv>` in `nproc` processes on this machine under torchrun (its entry point,
    `torch.distributed.run` with --standalone: a local rendezvous on a free port, run through `torchrun`
    below); returns its exit status. `argv` must not contain --nproc (see `strip_nproc`)."""
    command = [sys.executable, "-m", "prunekit.distributed", "--nproc-per-node", str(nproc), "--standalone",
               "-m", "prunekit", *argv]
    env = dict(os.environ)
    # N processes x all cores each would oversubscribe the CPU; torchrun's own default is 1 thread
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    return subprocess.call(command, env=env)


def torchrun(argv: list[str]) -> int:
    """torchrun (`torch.distributed.run.main`) that answers Ctrl-C and SIGTERM quietly. torchrun stops its
    workers (rank 0 says what was interrupted and what was written), then raises SignalException, whose
    traceback would end the output; here that is exit 128 + the signal instead. Its warnings (timestamped
    lines such as one per worker it signals) would bury the workers' own messages: only its errors show,
    unless LOGLEVEL asks for more."""
    if "LOGLEVEL" not in os.environ:
        import logging
        os.environ["LOGLEVEL"] = "ERROR"            # torchrun's loggers that read it (and the workers' own)
        logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)     # and those that do not
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as run
    try:
        run(argv)
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":          # `python -m prunekit.distributed TORCHRUN-ARGS`: what `launch` runs
    sys.exit(torchrun(sys.argv[1:]))
