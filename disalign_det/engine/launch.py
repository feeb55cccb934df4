"""``launch`` that also trains with several processes on CPU-only machines (gloo).

It is detectron2's own ``launch`` (NCCL on GPUs) wherever that can run: always on machines with
CUDA, and on CPU-only machines with detectron2 main, whose workers use gloo without CUDA. Only
detectron2 v0.6 on a CPU-only machine (it asserts CUDA in every spawned worker) uses the workers of
this module, which join with gloo and set up detectron2's local process group
(``disalign_det.compat.features.launch_supports_cpu``; this path goes with v0.6).
"""

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from ..compat import features

__all__ = ["launch", "launch_from_argv", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _find_free_port():
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Same signature as ``detectron2.engine.launch``; ``num_gpus_per_machine`` counts processes
    per machine on CPU-only machines."""
    world_size = num_machines * num_gpus_per_machine
    if world_size > 1 and dist_url is None and num_machines == 1:
        dist_url = "auto"  # a free local port (detectron2 would fall back to env://)
    if world_size <= 1 or torch.cuda.is_available() or features.launch_supports_cpu():
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url is None or dist_url == "auto":  # (None: several machines, see above)
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.info("Launching %d CPU processes (gloo) at %s", world_size, dist_url)
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def launch_from_argv(main_func, argv=None):
    """A tool's command line: detectron2's ``default_argument_parser`` on ``argv`` (default
    ``sys.argv[1:]``), then ``main_func(args)`` in ``args.num_gpus`` processes per machine through
    :func:`launch`. Returns what ``main_func`` returns in a single process."""
    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        backend="gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=global_rank,
        timeout=timeout,
    )
    features.create_local_process_group(num_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
