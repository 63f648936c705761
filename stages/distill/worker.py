"""One rank of a data-parallel distillation: the module torchrun starts in every process (``stages.distributed``).

Node 0's ranks are started by the distill stage itself (``stages.distill.run`` with ``runtime.distributed``), with
the spec file it wrote; the ranks of every other node are started by hand or by a cluster's job script, with no spec
(it reaches them from rank 0 through the process group)::

    torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr node0 --master_port 29500 \\
        -m stages.distill.worker --device cuda

Each rank runs ``stages.distill.run_rank`` on its share; rank 0 writes the model and hands the result back.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.distill.worker", description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", help="the stage's spec file (node 0 only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="cpu (gloo) or cuda (nccl, one GPU per process); default: cuda if there is one. "
                        "Every node must use the same.")
    a = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from stages import distill
    from stages.config import DistillConfig, ModelsConfig, RuntimeConfig
    from stages.distributed import die_with_parent, finish, init, progress_writer, receive_spec, record_error
    from stages.progress import reporting

    die_with_parent()  # a rank never outlives its launcher
    rank = init(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = None
    try:
        spec = receive_spec(rank, a.spec)
        work = Path(spec["work_dir"])
        runtime = RuntimeConfig.model_validate(spec["runtime"])
        if runtime.threads:
            torch.set_num_threads(runtime.threads)
        args = {k: v for k, v in spec.items() if k not in ("cfg", "models", "runtime", "work_dir", "shared_paths")}
        with reporting(progress_writer(work)) if rank.main else contextlib.nullcontext():
            result = distill.run_rank(DistillConfig.model_validate(spec["cfg"]),
                                      ModelsConfig.model_validate(spec["models"]), runtime, rank=rank, **args)
        if result is not None:
            finish(work, {"outputs": result.outputs, "metrics": result.metrics, "compute": result.compute})
    except BaseException as e:
        if work is not None:
            record_error(work, e)
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
