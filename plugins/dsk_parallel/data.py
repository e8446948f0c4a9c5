"""Data parallelism on torch.distributed: ``replicate``, ``fsdp`` (FSDP2) and ``zero1`` (ZeRO-1).

Every strategy here spans all ranks with a 1-D DeviceMesh on the default process group (the core initialised it;
data rank = rank). Each rank runs its slice of the global batch (:meth:`dsk.api.runtime.BuiltRun.local_rows`),
its micro-batch losses weighted by :meth:`~dsk.api.runtime.BuiltRun.loss_weights`, and the strategy makes every
gradient the mean over the ranks, so N ranks with batch b train as one process with batch N * b:

- ``replicate``: torch's composable ``replicate`` (DistributedDataParallel's bucketed all-reduce, overlapped with
  the backward) on the whole model;
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block, on the root's other parts and on the root:
  parameters, gradients and the optimizer state are sharded; parameters are all-gathered per unit, gradients
  reduce-scattered;
- ``zero1``: gradients all-reduced as ``replicate``, the optimizer state sharded by torch's
  ``ZeroRedundancyOptimizer`` (each rank updates its share of the parameters and broadcasts them), what
  DeepSeek-V3 trained with.

Parameters another strategy sharded itself (:data:`dsk.api.SHARDED_PARAM`, expert slices) are left out of the
wrap and of every reduction by ``replicate``, ``fsdp`` and ``zero1``. ``zero1`` steps them apart from ZeRO
(:class:`ZeroWithShards`: ZeRO would broadcast one rank's slice over the others'), and its checkpoint methods
chain with that strategy's (``composes_checkpoints``): DeepSeek-V3's layout, expert parallelism inside ZeRO-1 data
parallelism. ``fsdp`` composes the same way (:class:`FSDPWithShards`: a plain optimizer over its DTensor shards,
another over the slices, as one fused step cannot mix the two kinds). Checkpoints are the one-process format: the
checkpoint methods gather the full state on the writer under the unwrapped model's names and load a full state on
every rank.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsk.api import SHARDED_PARAM, ParallelStrategy
from dsk.api.runtime import Block, RunSetupError
from dsk_parallel.layout import RankLayout, local_rank

__all__ = ["FSDP", "FSDPWithShards", "Replicate", "Zero1", "ZeroWithShards"]

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class _DataParallel(RankLayout):
    """The process layout shared by the data-parallel strategies: one 1-D mesh over every rank.

    ``setup`` builds the mesh on the default group (a 1-D mesh over the whole world reuses that group, so there is
    nothing of its own to free in ``teardown`` unless torch made one); the reductions run over the mesh's group,
    on the device the backend needs (a CPU tensor is reduced through the rank's GPU under NCCL).
    """

    #: the ``type`` this strategy is registered under (for messages)
    kind: str = ""

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.mesh: Any = None
        self._own_group = False

    # -- process layout ----------------------------------------------------------------------------------------
    def setup(self, run: Any) -> None:
        """Build the 1-D data-parallel mesh over every rank of the default process group."""
        from torch.distributed.device_mesh import init_device_mesh

        if not self._read_world(run):
            return  # one process: the strategy is the one-process base class (see _one_process_is_the_base)
        if self._cuda:
            torch.cuda.set_device(local_rank())
        device = "cuda" if self._cuda else "cpu"
        if self.pp > 1:  # under a pipeline: the DP ranks of this rank's stage (layout.py)
            if self.kind == "fsdp":
                raise RunSetupError(
                    f'parallel.{self.name} (type = "fsdp") cannot run under a pipeline: FSDP gathers and reshards '
                    "parameters per forward, which a pipeline's interleaved chunks would repeat for every "
                    'micro-batch; use type = "zero1" (DeepSeek-V3\'s choice) or "replicate"'
                )
            self.mesh = init_device_mesh(device, (self.pp, self._world), mesh_dim_names=("pp", "data"))["data"]
        else:
            self.mesh = init_device_mesh(device, (self._world,), mesh_dim_names=("data",))
        self.group = self.mesh.get_group()
        self._own_group = self.group is not dist.group.WORLD

    # -- reductions --------------------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over the data ranks; ``mean`` is the sum divided by the world size."""
        if op not in _OPS:
            raise ValueError(f"all_reduce op {op!r}: expected one of {sorted(_OPS)}")
        if self._world == 1:
            return tensor
        work = tensor
        if self._cuda and tensor.device.type != "cuda":
            work = tensor.to(f"cuda:{local_rank()}")
        dist.all_reduce(work, op=_OPS[op], group=self.group)
        if op == "mean":
            work.div_(self._world)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def reduce_step_statistics(self, tensors: list[torch.Tensor]) -> None:
        """Sum the router loads (and any step statistics) over the data ranks: one all-reduce per dtype and device."""
        self._all_reduce_flat(tensors, "sum")

    def _all_reduce_flat(self, tensors: list[torch.Tensor], op: str) -> None:
        """Reduce ``tensors`` in place over the data ranks: one flat all-reduce per dtype and device."""
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for group in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self.all_reduce(flat, op)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def teardown(self) -> None:
        """Free the process groups this strategy made (never the default group: the core owns it)."""
        if self._own_group and self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.mesh = self.group = None
        self._own_group = False

    # -- helpers -----------------------------------------------------------------------------------------------
    def _refuse_optimizer_wrappers(self, run: Any, why: str) -> None:
        """Raise when a ``[features.*]`` table wraps the optimizer after this strategy did (CPU offload)."""
        section = getattr(run, "section", None)
        features = (section("features") if section is not None else None) or {}
        for key, slot in features.items():
            try:
                impl = slot.load()
            except Exception:  # noqa: BLE001 - a feature that does not import fails later with its own message
                continue
            if "wrap_optimizer" in getattr(impl, "stages", ()):
                raise RunSetupError(
                    f'parallel.{self.name} (type = "{self.kind}") cannot run with features.{key} '
                    f'(type = "{slot.name}"), which wraps the optimizer: {why}; drop one of the two tables'
                )


def _sharded_elsewhere(p: torch.Tensor) -> bool:
    return bool(getattr(p, SHARDED_PARAM, False))


def _one_process_is_the_base(cls: type) -> type:
    """On one rank a data-parallel strategy is the one-process layout: ``wrap_*`` and the checkpoint methods are the
    base class's, so a recipe with ``[parallel.data]`` also runs, unchanged, without ``--nproc``."""
    names = ("wrap_model", "wrap_optimizer", "model_state_dict", "load_model_state_dict", "optimizer_state_dict",
             "load_optimizer_state_dict")  # fmt: skip
    for name in names:
        own = cls.__dict__.get(name)
        if own is None:
            continue
        base = getattr(ParallelStrategy, name)

        @functools.wraps(own)
        def method(self: _DataParallel, *args: Any, _own: Any = own, _base: Any = base, **kwargs: Any) -> Any:
            return (_base if self._world == 1 else _own)(self, *args, **kwargs)

        setattr(cls, name, method)
    return cls


@_one_process_is_the_base
class Replicate(_DataParallel):
    """``[parallel.<key>] type = "replicate"``: plain data parallelism (torch's composable ``replicate``).

    The model stays whole on every rank; DistributedDataParallel's reducer all-reduces the gradients in buckets
    during the backward and divides by the world size (the mean). Rank 0's parameters and buffers are broadcast
    once, when the model is wrapped; buffers are not broadcast again at every forward (the router biases move
    identically on every rank from all-reduced loads, and a forward on one rank only, as in generation, must not
    start a collective). Modules whose parameters are all :data:`dsk.api.SHARDED_PARAM` are left out.
    """

    kind = "replicate"

    def wrap_model(self, model: nn.Module, run: Any) -> nn.Module:
        """Apply ``replicate`` to ``model`` in place (names and the module tree are unchanged)."""
        if self._world == 1:
            return model
        if self.pp > 1:
            # a pipeline runs its stages chunk by chunk, outside the model's forward, so DDP's per-forward reducer
            # never arms; the gradients are averaged once per step instead (sync_gradients), as DualPipe's
            # data-parallel ranks do after the schedule
            _broadcast_dense(model, self.group)
            return model
        from torch.distributed._composable.replicate import replicate

        ignored = _modules_of_sharded_params(model, self.name)
        bucket = getattr(self.config, "bucket_cap_mb", 25.0)
        placement = {"device_id": torch.device(f"cuda:{local_rank()}")} if self._cuda else {}
        replicate(
            model,
            ignored_modules=ignored,
            process_group=self.group,
            forward_sync_buffers=False,
            bucket_cap_mb=bucket,
            **placement,
        )
        # the DDP reducer is made at the first forward, and its construction is collective (rank 0's weights are
        # broadcast): make it now, while every rank is building the run, not in a forward only some ranks run
        replicate.state(model).lazy_init()
        return model

    def sync_gradients(self, model: nn.Module) -> None:
        """Under a pipeline: every gradient not sharded elsewhere becomes the mean over this stage's DP ranks (one
        flat all-reduce per dtype). Otherwise DDP's hooks have already done it during the backward."""
        if self._world == 1 or self.pp == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad and not _sharded_elsewhere(p)]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # a rank whose chunks never reached it still takes part
        self._all_reduce_flat([p.grad for p in params], "mean")


def _broadcast_dense(model: nn.Module, group: Any) -> None:
    """Rank 0 of ``group``'s values of every parameter and buffer not sharded elsewhere, on every rank of it."""
    tensors = [t.data for t in (*model.parameters(), *model.buffers()) if not _sharded_elsewhere(t)]
    src = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t, src=src, group=group)


def _gathered(optimizer: FSDPWithShards, is_writer: bool) -> dict[torch.Tensor, dict[str, Any]]:
    """The state by parameter of an :class:`FSDPWithShards`: the DTensor parameters' entries gathered whole on the
    writer (collective: every rank runs the same gathers in the groups' order), this rank's slices' on every rank
    (for the strategy that sharded them to gather next)."""
    from torch.distributed.tensor import DTensor

    state: dict[torch.Tensor, dict[str, Any]] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            entry = optimizer.state.get(p)
            if not entry:
                continue
            if _sharded_elsewhere(p):
                state[p] = dict(entry)
                continue
            full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in entry.items()}
            if is_writer:
                state[p] = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in full.items()}
    return state


def _own_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's values of the parameters another strategy sharded, by every name the model gives them."""
    return {n: p for n, p in model.named_parameters(remove_duplicate=False) if _sharded_elsewhere(p)}


def _modules_of_sharded_params(model: nn.Module, name: str) -> set[nn.Module]:
    """The modules whose own parameters are all :data:`~dsk.api.SHARDED_PARAM` (replicate ignores whole modules).

    Raises:
        RunSetupError: a module holds sharded and replicated parameters side by side.
    """
    out = set()
    for mod_name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        sharded = [p for p in own if _sharded_elsewhere(p)]
        if sharded and len(sharded) < len(own):
            raise RunSetupError(
                f"parallel.{name}: module {mod_name!r} holds both sharded ({SHARDED_PARAM}) and replicated "
                "parameters; replicate can leave out whole modules only"
            )
        if sharded:
            out.add(module)
    return out


@_one_process_is_the_base
class FSDP(_DataParallel):
    """``[parallel.<key>] type = "fsdp"``: FSDP2 ``fully_shard`` on each transformer block, then on the root.

    Mixed precision: with ``[features.bf16]`` on, its autocast hooks stay in charge of the compute dtypes and FSDP
    reduces the gradients in the feature's ``reduce_dtype``; the parameters are gathered in FP32. Gathering them
    in BF16 (``param_dtype``) would also make FSDP cast each block's inputs and every parameter of a unit to BF16:
    the residual stream, the RMSNorm gains and the router weights, which one-process bf16 keeps in FP32 (the
    docstring of ``dsk_precision.bf16`` lists them). With FP32 gathers the numbers are those of one process.

    Clipping needs nothing of its own: the gradients are DTensors, and torch's ``clip_grad_norm_`` on them all-reduces
    the shards' partial norms, so it clips by the whole model's norm (the base class's method; checked against one
    process), and a composed strategy that clips by its own rule sees the same DTensors.

    With another strategy that sharded parameters itself (expert slices, :data:`dsk.api.SHARDED_PARAM`), they stay
    out of the units (plain tensors, not reduced), the optimizer becomes an :class:`FSDPWithShards`, and the
    checkpoint methods chain with that strategy's (``composes_checkpoints``): the dense state gathered on the
    writer plus this rank's slices' entries on every rank; on load, the slices' entries as that strategy cut them.
    """

    kind = "fsdp"
    composes_checkpoints = True

    def wrap_model(self, model: nn.Module, run: Any) -> nn.Module:
        """Shard every :class:`dsk.api.runtime.Block` (main layers and MTP blocks), then each of the root's other
        parts with parameters of their own, then the root; in place (names unchanged).

        The root's parts (embedding, final norm, output head, the MTP heads' own projections) are units of their
        own so that a caller may run one outside the root's forward: generation runs ``lm_head`` on the last
        hidden states, speculative decoding the MTP heads. Parts that share a parameter (a tied head and the
        embedding) form one unit.
        """
        from torch.distributed.fsdp import fully_shard

        kwargs = {
            "mesh": self.mesh,
            "reshard_after_forward": bool(getattr(self.config, "reshard_after_forward", True)),
            "mp_policy": self._mp_policy(run),
        }
        ignored = {p for p in model.parameters() if _sharded_elsewhere(p)}

        def shard(module: nn.Module | list[nn.Module]) -> None:
            mods = module if isinstance(module, list) else [module]
            own = ignored & {p for m in mods for p in m.parameters()}
            fully_shard(module, ignored_params=own or None, **kwargs)

        managed: set[nn.Parameter] = set(ignored)
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            shard(block)
            managed |= set(block.parameters())
        units: list[tuple[list[nn.Module], set[nn.Parameter]]] = []
        for child in model.children():
            own = set(child.parameters()) - managed
            if not own:
                continue
            for mods, params in units:
                if params & own:  # a shared parameter: one unit
                    mods.append(child)
                    params |= own
                    break
            else:
                units.append(([child], own))
        for mods, _ in units:
            shard(mods if len(mods) > 1 else mods[0])
        shard(model)
        return model

    def _mp_policy(self, run: Any) -> Any:
        """FSDP's MixedPrecisionPolicy: the reduce dtype of a feature's precision policy (see the class docstring)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        for feature in _features_of(run):
            policy = getattr(feature, "policy", None)
            if policy is not None and hasattr(policy, "fsdp_policy"):
                wanted = policy.fsdp_policy()
                return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=wanted.reduce_dtype)
        return MixedPrecisionPolicy()

    def wrap_optimizer(self, optimizer: Any, model: nn.Module, run: Any) -> Any:
        self._refuse_optimizer_wrappers(
            run, "its host copies of the parameters would be whole tensors, FSDP's are shards (DTensors)"
        )
        if any(_sharded_elsewhere(p) for g in optimizer.param_groups for p in g["params"]):
            if optimizer.state:
                raise RunSetupError(f"parallel.{self.name}: the optimizer already has state; it must be a new one")
            return FSDPWithShards(optimizer, None)  # the slices (plain tensors) apart from the DTensors
        return optimizer

    # -- checkpoints -------------------------------------------------------------------------------------------
    @staticmethod
    def _options(**kwargs: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kwargs)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full model state gathered on the writer (CPU); ``{}`` on the other ranks. The parameters another
        strategy sharded (left out of the units: plain tensors) are this rank's slices, on every rank."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=self._options(full_state_dict=True, cpu_offload=True))
        state = dict(state) if self.is_writer else {}
        if getattr(getattr(model, "config", None), "tie_embeddings", False):
            state.pop("lm_head.weight", None)  # the one-process format: the loader re-ties it
        state.update(_own_shards(model))  # every rank: this rank's slices, for their strategy to gather
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], where: str) -> bool:
        """Load a full state (every rank holds it) into the sharded model; each rank keeps its shards. The entries
        of parameters another strategy sharded are loaded as given: that strategy already cut them to this rank."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = dict(state)
        if getattr(getattr(model, "config", None), "tie_embeddings", False) and "lm_head.weight" not in state:
            if "embed_tokens.weight" in state:
                state["lm_head.weight"] = state["embed_tokens.weight"]
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise RunSetupError(
                f"{where}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        try:
            set_model_state_dict(model, state, options=self._options(full_state_dict=True, strict=True))
        except (RuntimeError, ValueError) as exc:
            raise RunSetupError(f"{where}: weights do not match the model: {exc}") from None
        return True

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The full optimizer state in dsk's named format, gathered on the writer (``({}, {})`` elsewhere); with
        parameters another strategy sharded, every rank also returns their state (``composes_checkpoints``)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, FSDPWithShards):
            return _to_dsk_format(optimizer, type(optimizer.local).__name__, _gathered(optimizer, self.is_writer))
        by_name: dict[str, dict[str, Any]] = {}
        if optimizer.state:  # empty before the first step, on every rank alike: nothing to gather
            full = get_optimizer_state_dict(
                model, optimizer, options=self._options(full_state_dict=True, cpu_offload=True)
            )
            by_name = dict(full.get("state", {}))  # the writer's: the other ranks get nothing with cpu_offload
        if not self.is_writer:
            return {}, {}
        state = {
            p: by_name[name]
            for g in optimizer.param_groups
            for name, p in zip(g["names"], g["params"], strict=True)
            if name in by_name
        }
        return _to_dsk_format(optimizer, type(optimizer).__name__, state)

    def load_optimizer_state_dict(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        where: str,
    ) -> bool:
        """Load a full dsk-format state (every rank holds it); each rank keeps the shards of its parameters."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if isinstance(optimizer, FSDPWithShards):  # the slices' entries already this rank's
            optimizer.load_full(_from_dsk_format(optimizer, type(optimizer.local).__name__, tensors, meta, where))
            return True
        loaded = _from_dsk_format(optimizer, type(optimizer).__name__, tensors, meta, where)
        if not loaded["state"]:  # a state saved before the first step: the fresh optimizer is that state
            return True
        names = [n for g in loaded["param_groups"] for n in g["names"]]
        state = {
            "state": {names[i]: entry for i, entry in loaded["state"].items()},
            "param_groups": [{**g, "params": list(g["names"])} for g in loaded["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, state, options=self._options(full_state_dict=True))
        return True


@_one_process_is_the_base
class Zero1(Replicate):
    """``[parallel.<key>] type = "zero1"``: ``replicate``'s gradient all-reduce, the optimizer state sharded.

    :meth:`wrap_optimizer` rebuilds the ``[optimizer]`` component's optimizer as a ``ZeroRedundancyOptimizer`` of
    the same class, param groups (with their ``"names"``) and defaults: each rank holds the state of its share of
    the parameters (a greedy size balance), runs the update on that share and broadcasts the new values. The
    schedule sets ``lr`` on the outer groups as usual (ZeRO copies it to the inner optimizer at each step).
    A feature that wraps the optimizer afterwards (CPU offload) is refused: it would step copies of the parameters
    that ZeRO does not own.

    With another ``[parallel.*]`` strategy that sharded parameters itself (expert parallelism: its slices differ
    per rank), the optimizer is a :class:`ZeroWithShards` instead: ZeRO over the other parameters, a plain local
    optimizer of the same class over the slices. The checkpoint methods then return each rank's slices' state on
    every rank, for that strategy to gather (``composes_checkpoints``: the build path chains the two strategies'
    checkpoint methods), and load the slices it cut from a full state.
    """

    kind = "zero1"
    composes_checkpoints = True

    def wrap_optimizer(self, optimizer: Any, model: nn.Module, run: Any) -> Any:
        """A ZeroRedundancyOptimizer over the same groups as ``optimizer`` (whose state must still be empty), or a
        :class:`ZeroWithShards` when another strategy sharded some of the parameters."""
        from torch.distributed.optim import ZeroRedundancyOptimizer

        self._refuse_optimizer_wrappers(
            run, "it would step host copies of the parameters, while ZeRO-1 steps each rank's share of the real ones"
        )
        if optimizer.state:
            raise RunSetupError(f"parallel.{self.name}: the optimizer already has state; ZeRO-1 must wrap a new one")
        if any(_sharded_elsewhere(p) for g in optimizer.param_groups for p in g["params"]):
            section = getattr(run, "section", None)
            others = [k for k in ((section("parallel") if section is not None else None) or {}) if k != self.name]
            if not others:
                # nobody owns these slices' gradients and checkpoints: ZeRO would broadcast one rank's slice over
                # the others', and no strategy would gather them
                raise RunSetupError(
                    f'parallel.{self.name} (type = "zero1"): the model has parameters sharded outside any '
                    "[parallel.*] strategy of the recipe (expert slices), which ZeroRedundancyOptimizer would "
                    "overwrite with other ranks' slices; add the strategy that shards them (parallel.expert)"
                )
            return ZeroWithShards(optimizer, self.group)
        groups = [dict(g) for g in optimizer.param_groups]
        return ZeroRedundancyOptimizer(
            groups, optimizer_class=type(optimizer), process_group=self.group, **_constructor_defaults(optimizer)
        )

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every rank's shard consolidated on the writer, in dsk's named format (``({}, {})`` elsewhere).

        With a :class:`ZeroWithShards`, every rank also returns the state of its own slices (the writer with the
        consolidated rest): the strategy that sharded them gathers them next (collective over its group)."""
        if isinstance(optimizer, ZeroWithShards):
            state = _consolidated(optimizer.zero, self.is_writer) if optimizer.zero is not None else {}
            state.update({p: entry for p, entry in optimizer.local.state.items() if entry})
            return _to_dsk_format(optimizer, type(optimizer.local).__name__, state)
        zero = _zero_of(optimizer, self.name)
        state = _consolidated(zero, self.is_writer)
        if not self.is_writer:
            return {}, {}
        return _to_dsk_format(zero, type(zero.optim).__name__, state)

    def load_optimizer_state_dict(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        where: str,
    ) -> bool:
        """Load a full dsk-format state on every rank; ZeRO keeps the entries of this rank's share only (a
        :class:`ZeroWithShards` also loads the slices' entries, already cut to this rank's slices)."""
        if isinstance(optimizer, ZeroWithShards):
            optimizer.load_full(_from_dsk_format(optimizer, type(optimizer.local).__name__, tensors, meta, where))
            return True
        zero = _zero_of(optimizer, self.name)
        _load_zero(zero, _from_dsk_format(zero, type(zero.optim).__name__, tensors, meta, where))
        return True


def _consolidated(zero: Any, is_writer: bool) -> dict[torch.Tensor, dict[str, Any]]:
    """ZeRO's state of every parameter, by parameter, on the writer (collective; ``{}`` on the other ranks)."""
    zero.consolidate_state_dict(to=0)
    if not is_writer:
        return {}
    full = zero.state_dict()  # the state by global index over the outer groups
    zero._all_state_dicts = []  # drop the consolidated copy: it is the whole optimizer state
    params = [p for g in zero.param_groups for p in g["params"]]
    return {params[i]: entry for i, entry in full["state"].items() if entry}


def _load_zero(zero: Any, state_dict: dict[str, Any]) -> None:
    """A full torch-format state into ZeRO (it keeps this rank's share)."""
    zero.load_state_dict(state_dict)
    # the outer optimizer keeps a dtype-cast copy of this rank's entries that nothing reads (steps use the inner
    # optimizer's state, which keeps the saved dtypes: BF16 moments stay BF16)
    zero.state.clear()


class _StateOfParams(Mapping):
    """``optimizer.state`` of a :class:`ZeroWithShards` by parameter: ZeRO's inner state of this rank's share of
    the replicated parameters, the local optimizer's of the slices."""

    def __init__(self, owner: ZeroWithShards):
        self._owner = owner

    def _parts(self) -> list[Any]:
        zero = self._owner.zero
        return ([getattr(zero, "optim", zero).state] if zero is not None else []) + [self._owner.local.state]

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        for part in self._parts():
            if p in part:
                return part[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for part in self._parts() for p in part)

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts())


class ZeroWithShards(torch.optim.Optimizer):
    """ZeRO-1 over the replicated parameters, a plain local optimizer over the slices another strategy sharded.

    The slices (:data:`dsk.api.SHARDED_PARAM`, expert parallelism's) differ per rank, so ZeRO, which updates each
    parameter on one rank and broadcasts it to the others, must never hold them: each rank steps its own with an
    instance of the same optimizer class (the same defaults and group hyper-parameters). The outer
    ``param_groups`` are the ``[optimizer]`` component's (one-process names and order, every parameter): the
    schedule writes ``lr`` there and clipping reads the parameters there; each step copies the groups'
    hyper-parameters onto the two inner optimizers' groups.

    Args:
        optimizer: the freshly built ``[optimizer]`` (no state yet); its groups record ``"names"``.
        group: the data-parallel process group ZeRO shards over.

    Attributes:
        zero: the ZeroRedundancyOptimizer over the replicated parameters (None when there are none).
        local: the optimizer over this rank's slices.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group: Any):
        kind, defaults = type(optimizer), _constructor_defaults(optimizer)
        groups = [dict(g) for g in optimizer.param_groups]
        dense: list[dict[str, Any]] = []
        sharded: list[dict[str, Any]] = []
        #: per outer group: (index in zero's groups or None, index in local's groups or None)
        self._routes: list[tuple[int | None, int | None]] = []
        for g in groups:
            names = list(g.get("names") or [""] * len(g["params"]))
            hyper = {k: v for k, v in g.items() if k not in ("params", "names")}
            route: list[int | None] = [None, None]
            for slot, out, keep in ((0, dense, False), (1, sharded, True)):
                pairs = [(n, p) for n, p in zip(names, g["params"], strict=True) if _sharded_elsewhere(p) is keep]
                if pairs:
                    route[slot] = len(out)
                    out.append({**hyper, "params": [p for _, p in pairs], "names": [n for n, _ in pairs]})
            self._routes.append((route[0], route[1]))
        self.zero = self._dense_optimizer(dense, kind, defaults, group) if dense else None
        self.local = kind(sharded, **defaults)
        super().__init__(groups, dict(optimizer.defaults))
        self.state = _StateOfParams(self)  # type: ignore[assignment]

    @staticmethod
    def _dense_optimizer(dense: list[dict[str, Any]], kind: type, defaults: dict[str, Any], group: Any) -> Any:
        """The optimizer over the parameters nobody else sharded: ZeRO over ``group``."""
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(dense, optimizer_class=kind, process_group=group, **defaults)

    def _load_dense(self, state_dict: dict[str, Any]) -> None:
        _load_zero(self.zero, state_dict)

    def _push_hyperparameters(self) -> None:
        """Every outer group key but ``params`` and ``names`` (lr set by the schedule, weight decay...) onto the
        inner groups it feeds (ZeRO copies them on to its own inner optimizer when it steps)."""
        for outer, (zi, li) in zip(self.param_groups, self._routes, strict=True):
            inner = [self.zero.param_groups[zi]] if zi is not None else []
            inner += [self.local.param_groups[li]] if li is not None else []
            hyper = {k: v for k, v in outer.items() if k not in ("params", "names")}
            for group in inner:
                group.update(hyper)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """ZeRO's step (this rank's share, then the broadcasts), then the local step of this rank's slices."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._push_hyperparameters()
        if self.zero is not None:
            self.zero.step()
        self.local.step()
        return loss

    def load_full(self, state_dict: dict[str, Any]) -> None:
        """A torch-format state over the outer groups (every parameter; the slices' entries already this rank's)
        into the two inner optimizers: ZeRO keeps its share of the rest, the local optimizer the slices'."""
        split: list[dict[str, Any]] = [{"state": {}, "param_groups": []}, {"state": {}, "param_groups": []}]
        counts = [0, 0]
        for g, saved in enumerate(state_dict["param_groups"]):
            outer, routes = self.param_groups[g], self._routes[g]
            ids: list[list[int]] = [[], []]
            names: list[list[str]] = [[], []]
            group_names = saved.get("names") or outer.get("names") or [""] * len(outer["params"])
            for index, p, name in zip(saved["params"], outer["params"], group_names, strict=True):
                slot = 1 if _sharded_elsewhere(p) else 0
                if index in state_dict["state"]:
                    split[slot]["state"][counts[slot]] = state_dict["state"][index]
                ids[slot].append(counts[slot])
                names[slot].append(name)
                counts[slot] += 1
            hyper = {k: v for k, v in saved.items() if k not in ("params", "names")}
            for slot, inner in enumerate(routes):
                if inner is not None:
                    split[slot]["param_groups"].append({**hyper, "params": ids[slot], "names": names[slot]})
        if self.zero is not None:
            self._load_dense(split[0])
        self.local.load_state_dict(split[1])
        for outer, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            outer.update({k: v for k, v in saved.items() if k not in ("params", "names")})


class FSDPWithShards(ZeroWithShards):
    """FSDP's optimizer when another strategy sharded some parameters: torch's optimizers step a group in one
    foreach / fused kernel, which refuses a list mixing FSDP's DTensor shards with the slices' plain tensors, so
    each kind gets its own instance of the optimizer class (the groups and routing of :class:`ZeroWithShards`).

    Attributes:
        zero: the optimizer over FSDP's DTensor parameters (None when there are none); the name is the base's.
        local: the optimizer over this rank's slices.
    """

    @staticmethod
    def _dense_optimizer(dense: list[dict[str, Any]], kind: type, defaults: dict[str, Any], group: Any) -> Any:
        return kind(dense, **defaults)

    def _load_dense(self, state_dict: dict[str, Any]) -> None:
        """A torch-format state of the DTensor parameters with full tensors: each rank keeps its shards."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in self.zero.param_groups for p in g["params"]]
        for index, entry in state_dict["state"].items():
            p = params[index]
            for key, value in list(entry.items()):
                if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                    entry[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        self.zero.load_state_dict(state_dict)


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's defaults that its constructor takes (torch's AdamW records ``decoupled_weight_decay``, which
    its ``__init__`` does not accept); every group keeps all its keys, which ZeRO copies to its inner groups."""
    import inspect

    params = inspect.signature(type(optimizer).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(optimizer.defaults)
    return {k: v for k, v in optimizer.defaults.items() if k in params}


def _zero_of(optimizer: Any, name: str) -> Any:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        raise RunSetupError(f"parallel.{name}: the run's optimizer is a {type(optimizer).__name__}, not ZeRO-1's")
    return optimizer


# -- dsk's optimizer format, through dsk.api.runtime's own converters ---------------------------------------------
class _Named:
    """What :func:`dsk.api.runtime.optimizer_state_to_tensors` and :func:`~dsk.api.runtime.load_optimizer_state`
    read of an optimizer (its class name, ``param_groups`` with ``"names"``, ``state`` by parameter), standing in
    for one whose state is spread over the ranks; ``load_state_dict`` keeps the torch-format state it is given."""

    def __init__(self, param_groups: list[dict[str, Any]], state: dict[Any, dict[str, Any]]):
        self.param_groups = param_groups
        self.state = state
        self.loaded: dict[str, Any] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict


def _named(class_name: str, param_groups: list[dict[str, Any]], state: dict[Any, dict[str, Any]]) -> _Named:
    """A :class:`_Named` whose type is called ``class_name`` (the format records the optimizer's class)."""
    return type(class_name, (_Named,), {})(param_groups, state)


def _to_dsk_format(
    optimizer: Any, class_name: str, state: dict[Any, dict[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of dsk's format from ``optimizer``'s groups and the full ``state`` by parameter."""
    from dsk.api.runtime import optimizer_state_to_tensors

    return optimizer_state_to_tensors(_named(class_name, optimizer.param_groups, state))


def _from_dsk_format(
    optimizer: Any, class_name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str
) -> dict[str, Any]:
    """The torch-format state dict (state by global index over ``optimizer``'s groups) of a dsk-format state,
    checked against the optimizer by :func:`dsk.api.runtime.load_optimizer_state` (class, groups, names)."""
    from dsk.api.runtime import load_optimizer_state

    named = _named(class_name, optimizer.param_groups, {})
    load_optimizer_state(named, tensors, meta, where)
    return named.loaded


def _features_of(run: Any) -> list[Any]:
    """The run's built features (``run.features``: the build path sets it before any strategy wraps the model)."""
    return list(getattr(run, "features", None) or [])
