"""One rank of a data-parallel stage: the module torchrun starts in every process (``llm_compress.distributed``).

Node 0's ranks are started by the stage itself (with ``runtime.distributed``), with the spec file it wrote, which
names the stage's function for a rank (``llm_compress.distill.apply:rank_main``,
``llm_compress.quantize.apply:rank_main``); the ranks of every other node are started by hand or by a cluster's job
script, the same line for any stage, with no spec (it reaches them from rank 0 through the process group)::

    torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr node0 --master_port 29500 \\
        -m llm_compress.worker --device cuda
"""

from __future__ import annotations

if __name__ == "__main__":
    from llm_compress.distributed import serve

    serve(None)
