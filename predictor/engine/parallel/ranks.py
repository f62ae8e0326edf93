"""Tensor parallelism over processes: one rank per GPU (or CPU process), driven from rank 0.

Rank 0 is the serving process: its batcher, scheduler, prefix index and sampling are the single engine's. It spawns
the other ranks itself (no ``torchrun``), each a process that loads the checkpoint, keeps its shard of every layer
(``sharding``) and then follows: before every forward pass rank 0 sends each follower the step's input tensors
(and the KV-cache row copies made since the last step, so that every rank's cache holds the same rows), over a pipe
of its own, and each per-request LoRA adapter copied into a slot, cut to the follower's shard (each step's tokens'
slots travel with its inputs); all ranks then run the same forward, meeting once per decoder layer in an all-reduce
(NCCL on GPUs, gloo on the CPU). The followers' logits are dropped: rank 0 samples.

Failure is loud and bounded. A follower that exits is seen at once by a watchdog on its process; one that hangs
makes rank 0's next collective time out (``collective_timeout_s``). Either way the engine is lost: ``on_lost`` is
called once with the reason (the serving layer stops the batcher's engine through the path of a dead worker, so
every request waiting or running gets a 503 and the probes fail, then ends the process), and every later step
raises ``EngineStopped``.
Followers end with rank 0: on its "stop", or when its pipe closes (rank 0 exited, however it ended).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ...errors import EngineStopped, UnsupportedOption
from ..model.falcon import FalconShape, StepTensors, moved
from ..model.kv_cache import KVCache
from ..lora.adapter import LoraAdapter
from ..lora.bank import AdapterBank
from ..model.runner import Engine
from ..model.loading import LoadSpec, resolve_device_and_dtype
from .sharding import load_shard, reads_slices, shard_adapter, tensor_parallel_refusal

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 60.0  # longest a rank may keep the others waiting in a collective before the engine is lost
STOP_TIMEOUT_S = 10.0  # how long a follower gets to end after "stop" before it is killed
# While --compile warms up, each rank compiles a shape at its own pace and the first there waits in the graph's
# all-reduce for the others' compiler: minutes, not the step's collective timeout.
COMPILE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class ParallelSpec:
    """How many ranks, and how long a collective may wait."""

    world: int
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S
    threads: int | None = None  # CPU threads per rank; None: the machine's cores shared out between the ranks


@dataclass
class _Follower:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection


def load_sharded_engine(spec: LoadSpec, parallel: ParallelSpec) -> ShardedEngine:
    """Spawn ranks 1..N-1, load and shard rank 0's part here, connect the group; the engine rank 0 serves with.
    Raises ``SystemExit`` with one line when the checkpoint or the machine cannot be split ``parallel.world`` ways,
    and ``RuntimeError`` when a follower dies while loading."""
    device, dtype = resolve_device_and_dtype(spec.device, spec.dtype)
    from transformers import AutoConfig  # noqa: PLC0415

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    refusal = tensor_parallel_refusal(AutoConfig.from_pretrained(spec.source, revision=spec.revision), parallel.world,
                                      device, gpus)
    if refusal:
        raise SystemExit(refusal)
    shard_spec = dataclasses.replace(spec, device=device, dtype=str(dtype).removeprefix("torch."))
    port = _free_port()
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    followers = []
    for rank in range(1, parallel.world):
        ours, theirs = context.Pipe()
        process = context.Process(target=follow, args=(shard_spec, parallel, rank, port, theirs),
                                  name=f"tensor-parallel-rank-{rank}")
        process.start()
        theirs.close()
        followers.append(_Follower(rank, process, ours))
    try:
        _set_threads(device, parallel)
        # Ranks reading their slices hold only their shards and load at once; the others one at a time, as each
        # holds the whole checkpoint in host memory while it loads.
        at_once = reads_slices(shard_spec)
        for follower in followers if at_once else ():
            follower.conn.send_bytes(pickle.dumps(("load",)))
        model, tokenizer, shape, adapter_shapes = load_shard(shard_spec, 0, parallel.world)
        for follower in followers:
            if not at_once:
                follower.conn.send_bytes(pickle.dumps(("load",)))
            _await_loaded(follower)
        for follower in followers:
            follower.conn.send_bytes(pickle.dumps(("connect",)))
        _connect(device, 0, parallel, port)
    except BaseException:
        for follower in followers:
            follower.process.kill()
        raise
    logger.info("Tensor parallelism: %d ranks, each with %d of %d K/V groups per layer (%s)", parallel.world,
                shape.kv_heads, shape.kv_heads * parallel.world, dist.get_backend())
    return ShardedEngine(model, tokenizer, shape, adapter_shapes, followers, parallel.collective_timeout_s,
                         spec.kv_cache_dtype)


class ShardedEngine(Engine):
    """Rank 0's engine: the single engine's scheduling and sampling over a shard of the model, sending each step
    to the followers before running it."""

    def __init__(self, model: torch.nn.Module, tokenizer, shape: FalconShape,
                 adapter_shapes: list[dict[str, tuple[int, int]]], followers: list[_Follower],
                 collective_timeout_s: float, kv_cache_dtype: str = "auto") -> None:
        super().__init__(model, tokenizer, kv_cache_dtype)
        self.adapter_shapes = adapter_shapes  # the whole model's: adapters are read whole, then cut per rank
        self.collective_timeout_s = collective_timeout_s
        self.shape = _reducing(shape)
        self.world = len(followers) + 1
        self.lost: str | None = None  # why the engine can no longer run
        self.on_lost: Callable[[str], None] = lambda reason: None  # called once, from the thread that found it
        self._followers = followers
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._watch, name="tensor-parallel-watchdog", daemon=True).start()
        atexit.register(self.close)

    def enable_lora(self, max_loras: int, max_rank: int) -> AdapterBank:
        self._send("enable_lora", max_loras, max_rank)
        self.lora = _ShardedBank(self, max_loras, max_rank)
        return self.lora

    def reserve(self, rows: int, compile: bool = False) -> KVCache:
        self._send("reserve", rows, compile)
        cache = super().reserve(rows, compile)
        cache.copies = []
        return cache

    def warm_up(self, progress: Callable[[int, int], None] = lambda done, total: None) -> float:
        self._send("timeout", COMPILE_TIMEOUT_S)
        _set_timeout(COMPILE_TIMEOUT_S)
        try:
            return super().warm_up(progress)
        finally:
            self._send("timeout", self.collective_timeout_s)
            _set_timeout(self.collective_timeout_s)

    def _forward(self, tensors: StepTensors, compiled: bool) -> torch.Tensor:
        if self.lost is not None:
            raise self._lost_error()
        copies, self.cache.copies = self.cache.copies, []
        self._send("step", _outgoing(tensors), compiled, copies)
        try:
            return super()._forward(tensors, compiled)
        except Exception as exc:  # noqa: BLE001 - the ranks ran this step apart: none can go on
            self._lose(f"rank 0's step failed: {exc}")
            raise self._lost_error() from exc

    def generate_beams(self, *args, **kwargs):
        # transformers' generate would run the shard without its all-reduces: the API refuses beams under TP.
        raise UnsupportedOption("beam search is not available with --tensor_parallel_size above 1",
                                param="num_beams")

    def _send(self, *message) -> None:
        data = pickle.dumps(message)
        self._send_each(lambda rank: data)

    def _send_each(self, data_for: Callable[[int], bytes]) -> None:
        """Send each follower its own message, ``data_for(its rank)`` pickled."""
        try:
            for follower in self._followers:
                follower.conn.send_bytes(data_for(follower.rank))
        except OSError as exc:  # its pipe closed: the follower is gone
            self._lose(f"a follower stopped listening: {exc}")
            raise self._lost_error() from exc

    def _watch(self) -> None:
        """Wait for any follower to exit; unless rank 0 is stopping them, the engine is lost."""
        sentinels = {follower.process.sentinel: follower for follower in self._followers}
        ended = multiprocessing.connection.wait(list(sentinels))
        if self._closing:
            return
        follower = sentinels[ended[0]]
        follower.process.join(1)
        self._lose(f"rank {follower.rank} exited with code {follower.process.exitcode}")

    def _lost_error(self) -> EngineStopped:
        return EngineStopped(f"the engine stopped (the tensor-parallel engine is lost: {self.lost}); the server "
                             "will be restarted")

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self.lost = reason
        logger.critical("Tensor-parallel engine lost: %s", reason)
        self.on_lost(reason)

    def kill_followers(self) -> None:
        """End every follower now (the engine is lost, or rank 0 is exiting in a hurry)."""
        self._closing = True
        for follower in self._followers:
            if follower.process.is_alive():
                follower.process.kill()

    def close(self) -> None:
        """Stop the followers (killing any that do not end within ``STOP_TIMEOUT_S``) and leave the group."""
        if self._closing and not any(f.process.is_alive() for f in self._followers):
            return
        self._closing = True
        for follower in self._followers:
            try:
                follower.conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass
        for follower in self._followers:
            follower.process.join(STOP_TIMEOUT_S)
            if follower.process.is_alive():
                logger.error("Rank %d did not stop within %g s: killed", follower.rank, STOP_TIMEOUT_S)
                follower.process.kill()
                follower.process.join()
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def follower_pids(self) -> list[int]:
        return [follower.process.pid for follower in self._followers]


class _ShardedBank(AdapterBank):
    """Rank 0's adapter bank: an adapter copied into a slot is cut to every rank's shard, each follower sent its
    own before the step that first uses it (placement and steps share the decode thread, so they arrive in order)."""

    def __init__(self, engine: ShardedEngine, max_loras: int, max_rank: int) -> None:
        super().__init__(engine.model, max_loras, max_rank)
        self._engine = engine

    def copy_in(self, index: int, adapter: LoraAdapter) -> None:
        world = self._engine.world
        self._engine._send_each(lambda rank: pickle.dumps(("lora_slot", index, shard_adapter(adapter, rank, world))))
        super().copy_in(index, shard_adapter(adapter, 0, world))


def follow(spec: LoadSpec, parallel: ParallelSpec, rank: int, port: int,
           conn: multiprocessing.connection.Connection) -> None:
    """A follower rank's life: load its shard, connect, then run every step rank 0 sends until told to stop or
    rank 0 is gone. Any failure ends the process non-zero, which rank 0's watchdog sees."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when ranks end (drain first)
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(message)s")
    try:
        _set_threads(spec.device, parallel)
        _expect(conn, "load")
        model, tokenizer, shape, _ = load_shard(spec, rank, parallel.world)
        conn.send_bytes(pickle.dumps(("loaded",)))
        _expect(conn, "connect")
        _connect(spec.device, rank, parallel, port)
        engine = Engine(model, tokenizer, spec.kv_cache_dtype)
        engine.shape = _reducing(shape)
        _follow_steps(engine, conn)
    except EOFError:
        logger.error("Rank 0 is gone: rank %d stops", rank)
        os._exit(1)
    except BaseException:  # noqa: BLE001 - logged, then the exit code tells rank 0
        logger.exception("Rank %d failed", rank)
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.inference_mode()
def _follow_steps(engine: Engine, conn: multiprocessing.connection.Connection) -> None:
    while True:
        kind, *args = pickle.loads(conn.recv_bytes())
        if kind == "stop":
            return
        if kind == "reserve":
            engine.reserve(*args)
        elif kind == "timeout":
            _set_timeout(*args)
        elif kind == "enable_lora":
            engine.enable_lora(*args)
        elif kind == "lora_slot":
            engine.lora.copy_in(*args)
        elif kind == "step":
            tensors, compiled, copies = args
            for source, target, tokens in copies:
                engine.cache.copy_columns(source, target, tokens)
            tensors = moved(tensors, engine.device)
            if tensors.lora is not None:  # the tokens' slots, over this rank's shard of the adapters
                tensors = dataclasses.replace(tensors, lora=dataclasses.replace(tensors.lora, bank=engine.lora))
            engine._forward(tensors, compiled)
        else:
            raise RuntimeError(f"unknown message from rank 0: {kind!r}")


def _await_loaded(follower: _Follower) -> None:
    """Wait for the follower's "loaded"; a follower that exits first fails the start."""
    if follower.conn not in multiprocessing.connection.wait([follower.conn, follower.process.sentinel]):
        follower.process.join(1)
        raise RuntimeError(f"tensor-parallel rank {follower.rank} exited with code {follower.process.exitcode} "
                           "while loading (its log says why)")
    follower.conn.recv_bytes()


def _expect(conn: multiprocessing.connection.Connection, kind: str) -> None:
    if (message := pickle.loads(conn.recv_bytes())) != (kind,):
        raise RuntimeError(f"rank 0 sent {message!r} where {kind!r} was due")


def _connect(device: str, rank: int, parallel: ParallelSpec, port: int) -> None:
    timeout = timedelta(seconds=parallel.collective_timeout_s)
    if device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=parallel.world, timeout=timeout, device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=parallel.world, timeout=timeout)


def _set_timeout(seconds: float) -> None:
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))  # no public setter (torch 2.13)


def _all_reduce(partial: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(partial)
    return partial


def _reducing(shape: FalconShape) -> FalconShape:
    shape.reduce = _all_reduce
    return shape


def _outgoing(step: StepTensors) -> StepTensors:
    """``step`` as sent to the followers: on the CPU, its adapters' view without rank 0's bank (each follower reads
    its own shard of the same slots)."""
    sent = moved(step, torch.device("cpu"))
    return sent if sent.lora is None else dataclasses.replace(sent, lora=dataclasses.replace(sent.lora, bank=None))


def _set_threads(device: str, parallel: ParallelSpec) -> None:
    if device == "cpu":
        torch.set_num_threads(parallel.threads or max(1, (os.cpu_count() or 1) // parallel.world))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
