"""Data-parallel training under torchrun: the process group, model wrapping, rank helpers, state gathering.

Launched by ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` ...),
``init_distributed`` joins the process group (NCCL on CUDA, gloo on CPU) and gives each rank
one device (``cuda:LOCAL_RANK``). Without a launcher everything here is a no-op for a world of 1.

The batch contract: ``train.batch_size`` is the GLOBAL batch of one micro-step. Every rank makes
every random draw of the whole global batch from the same seeded data generator (window starts,
clip picks: cheap) but gathers the tokens of its own contiguous block of rows only (``rank_rows``,
passed to ``Task.train_batch``), so the data position is the same on every rank (it is checkpointed
once and a resume may change the world size) and N ranks see exactly the rows one process would.

Checkpoints keep the single-process format whatever the parallelism: DDP saves the unwrapped
module from rank 0; FSDP gathers a full, CPU-offloaded state dict of the model and of the
optimizer to rank 0 (``torch.distributed.checkpoint.state_dict``), converted to the plain
``optimizer.state_dict()`` layout, so any world size (or none) can resume any checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from scratchlab.errors import UserError


@dataclass
class DistContext:
    """Where this process stands: its rank, the world size and the parallelism actually used."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp: what is in effect (none for a world of 1)
    owns_group: bool = False  # this run initialised the process group, so it destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # -- collectives (no-ops for a world of 1)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_mean(self, values: list[float], device: torch.device) -> list[float]:
        """The mean of each value over ranks (NaN/Inf propagate, so a non-finite rank is seen by all)."""
        if not self.enabled or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world_size).tolist()

    def all_mean_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a device tensor, kept on the device (a collective, no host read)."""
        if not self.enabled:
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any (e.g. a SIGTERM that reached one rank first)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_text(self, text: str | None, device: torch.device) -> str:
        """Rank 0's ``text`` on every rank (as bytes in a tensor: no pickling)."""
        if not self.enabled:
            return text or ""
        data = (text or "").encode("utf-8") if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.long, device=device)
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
        return bytes(buf.cpu().tolist()).decode("utf-8")

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 first, then the first rank of every other node, then the rest.

        For work that fills a cache (preparing the stdlib corpus, a tokenizer): the later ranks
        find it done instead of racing to write the same files (shared or node-local disk).
        """
        if not self.enabled:
            yield
            return
        if self.is_main:
            yield
        self.barrier()
        if not self.is_main and self.local_rank == 0:
            yield
        self.barrier()
        if not self.is_main and self.local_rank != 0:
            yield

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - peers already gone (a launcher's SIGTERM): the run is saved, exit 0
                pass


def launched_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None when not launched by it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise UserError(f"torchrun environment is malformed (RANK/WORLD_SIZE/LOCAL_RANK: {exc})") from exc
    return rank, world, local


def resolve_parallel(setting: str, world_size: int) -> str:
    """The parallelism in effect: ``train.parallel`` for a world > 1 (auto = ddp), else none."""
    if world_size <= 1:
        return "none"
    if setting == "none":
        raise UserError(
            f"launched with WORLD_SIZE={world_size} but train.parallel=none (every rank would train its own copy); "
            "set train.parallel=ddp, fsdp or auto"
        )
    return "ddp" if setting == "auto" else setting


def rank_device(base: torch.device, local_rank: int, world_size: int) -> torch.device:
    """One device per local rank: cuda:LOCAL_RANK on GPUs; the CPU is shared."""
    if world_size <= 1 or base.type == "cpu":
        return base
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "launch at most that many processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    raise UserError(f"train.device={base.type} does not support multi-process training; use cuda or cpu")


def init_distributed(parallel: str, batch_size: int, base_device: torch.device) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group (if launched by it): the context and this rank's device."""
    launched = launched_world()
    if launched is None:
        return DistContext(), base_device
    rank, world, local = launched
    mode = resolve_parallel(parallel, world)
    if mode == "none":
        return DistContext(rank=rank, world_size=world, local_rank=local), base_device
    if batch_size % world:
        raise UserError(
            f"train.batch_size ({batch_size}) is the global batch per micro-step and must be divisible by the "
            f"world size ({world}); use a multiple of {world}"
        )
    device = rank_device(base_device, local, world)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world, local_rank=local, parallel=mode, owns_group=owns), device


def rank_rows(batch_size: int, ctx: DistContext) -> slice | None:
    """This rank's contiguous block of rows of a global batch of ``batch_size``; None for a world of 1."""
    if not ctx.enabled:
        return None
    per = batch_size // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


def rank_slice(batch: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, torch.Tensor]:
    """This rank's contiguous block of rows of a global batch (every tensor is batch-first)."""
    if not ctx.enabled:
        return batch
    out = {}
    for key, value in batch.items():
        n = value.shape[0]
        per = n // ctx.world_size
        out[key] = value[ctx.rank * per : (ctx.rank + 1) * per]
    return out


# ---------------------------------------------------------------- wrapping


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """{dropped name: kept name} for parameters shared under several names (tied embeddings).

    The kept name is the first in sorted order, which is the one safetensors' ``save_model``
    keeps, so a gathered state dict saved with these names dropped has the same keys.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied = {}
    for group in names.values():
        kept, *dropped = sorted(group)
        tied.update({name: kept for name in dropped})
    return tied


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, find_unused: bool = False) -> nn.Module:
    """The module the training forward goes through. DDP wraps; FSDP2 shards ``model`` in place.

    FSDP shards every transformer block, then the root (embeddings, final norm, head), as the
    FSDP2 docs recommend: one all-gather per block in forward and backward.
    """
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    if ctx.parallel == "fsdp":
        shard = _fully_shard()
        blocks = getattr(model, "blocks", None)
        for block in blocks if isinstance(blocks, nn.ModuleList) else []:
            shard(block)
        shard(model)
        return model
    return model


def _fully_shard():
    """FSDP2's ``fully_shard`` (torch >= 2.6 exports it from torch.distributed.fsdp)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4-2.5
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError as exc:
            raise UserError(
                f"train.parallel=fsdp needs FSDP2 (torch >= 2.4, this is {torch.__version__}); use train.parallel=ddp "
                "or upgrade torch"
            ) from exc
    return fully_shard


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, ctx: DistContext, sync: bool) -> Iterator[None]:
    """Reduce gradients only on the last micro-batch of a step (grad accumulation without extra traffic)."""
    if ctx.parallel == "ddp" and not sync:
        with wrapped.no_sync():
            yield
    else:
        if ctx.parallel == "fsdp":
            wrapped.set_requires_gradient_sync(sync)
        yield


def clip_grad_norm(
    named: list[tuple[str, nn.Parameter]], max_norm: float
) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """Global gradient norm before clipping, then clip to ``max_norm``; works on FSDP2's DTensor grads.

    Returns (the norm, a 0-dim tensor on the device: never read here, so a step does not wait on it;
    the names of the parameters with a gradient; their gradient norms [n] on the device, for blaming
    parameters after a non-finite step, or None for DTensor grads). ``clip_grad_norm_`` is
    get_total_norm + clip_grads_with_norm_; with DTensors the norm is a partial DTensor that must be
    reduced (``full_tensor``) before it is a number (as torchtitan does). ``max_norm`` = inf: no clip.
    """
    live = [(n, p) for n, p in named if p.grad is not None]
    if not live:
        return torch.zeros(()), [], None
    names, params = [n for n, _ in live], [p for _, p in live]
    grads = [p.grad for p in params]
    per_param = None
    if any(hasattr(g, "full_tensor") for g in grads):
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
    else:  # get_total_norm's own arithmetic, keeping the per-parameter norms it computes anyway
        per_param = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        total = torch.linalg.vector_norm(per_param)
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total, names, per_param


def local_tensors(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensors (plain tensors are returned as they are)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


@torch.no_grad()
def sharded_update_ratio(before: list[torch.Tensor], after: list[torch.Tensor], ctx: DistContext) -> float | None:
    """||w_after - w_before|| / ||w_before|| over FSDP shards (sums of squares reduced over ranks).

    The doctor's ``update_ratio`` on one rank's shards would see only part of each matrix.
    """
    if not before:
        return None
    after = local_tensors(after)
    sq = torch.zeros(2, dtype=torch.float64, device=after[0].device)
    for b, a in zip(before, after):
        sq[0] += b.double().pow(2).sum()
        sq[1] += (b.double() - a.double()).pow(2).sum()
    if ctx.enabled:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    weight, delta = sq.sqrt().tolist()
    if not weight > 0 or not math.isfinite(weight):
        return None
    return delta / weight


# ---------------------------------------------------------------- state dicts


def full_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """A full CPU state dict of a sharded model on rank 0 (None elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if ctx.is_main else None


def _optimizer_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names of the optimizer's params, in the order optimizer.state_dict() numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict | None:
    """The optimizer state of a sharded model, gathered to rank 0 in ``optimizer.state_dict()``'s layout.

    ``get_optimizer_state_dict`` keys the state by parameter name; numbering the names in
    param-group order gives back the integer ids a single process would save.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not ctx.is_main:
        return None
    index = {name: i for i, name in enumerate(_optimizer_fqns(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]],
    }


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process layout optimizer state into the optimizer of a sharded model (every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_fqns(model, optimizer)
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
