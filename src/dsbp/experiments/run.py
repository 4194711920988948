"""One run and its directory.

A run directory holds::

    config.json     the full RunConfig (RunConfig.from_json re-creates it)
    env.json        torch version, device name, git commit, host, python (and one entry per resume)
    metrics.jsonl   train / eval / status records (see dsbp.experiments.loop)
    checkpoint.pt   model, optimizer (+ DSBP projector), LR schedule, grad scaler, every RNG,
                    epoch, next batch, step, training clock, number of metric records
    result.json     status (ok / diverged / error), final test accuracy and loss, wall_s

Every file is written atomically (temporary file + ``os.replace``). ``metrics.jsonl`` is
rewritten together with each checkpoint, so after an interruption the two agree; ``resume``
continues from the checkpoint (mid-epoch, through the loader's ``iter_epoch(epoch,
start_batch)``) and ends with the same weights and metrics as an uninterrupted run, bit for
bit on CPU.

Multi-process runs (``dsbp bench --nproc N``, ``N`` processes with ``torch.distributed``
initialised, e.g. by :func:`dsbp.optim.distributed.launch`): every rank builds the same data,
model and method from the same seed, takes its contiguous slice of each global batch
(:class:`RankShard`, so a step sees the same global batch as one process) and trains the model
wrapped in ``DistributedDataParallel``; only rank 0 writes files. See ``docs/distributed.md``.
"""

from __future__ import annotations

import dataclasses
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dsbp.experiments import atomic
from dsbp.experiments.build import (
    BuildContext,
    build_loss,
    build_method,
    build_model_for,
    build_schedule,
    load_data,
    resolve_device,
)
from dsbp.experiments.config import RunConfig
from dsbp.experiments.hostinfo import compute_info
from dsbp.experiments.loop import TrainState, train
from dsbp.experiments.track import build_trackers

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------ provenance
def git_commit(path: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``path``
    (default: this package's source)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip() != ""
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_name(device: torch.device) -> str:
    """A human-readable name: the GPU model for CUDA, the CPU model (or platform) otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (cached per path, size and modification time)."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def data_files(dataset: Any) -> list[dict[str, Any]]:
    """The data file(s) a loaded ``ImageDataset`` was read from: ``path``, ``bytes`` and
    ``sha256`` of each, found from its ``source`` (an absolute path there; the bundled
    subset's package file). A folder layout (e.g. the official IDX or pickle folders) lists
    every file in it."""
    import re

    source = str(getattr(dataset, "source", ""))
    paths: list[Path] = []
    if getattr(dataset, "name", None) == "bundled":
        from importlib import resources

        from dsbp.data import bundled

        res = resources.files("dsbp.data").joinpath("bundled").joinpath(bundled.FILE)
        paths.append(Path(str(res)))
    for token in re.findall(r"(/[^\s,;()]+)", source):
        p = Path(token.rstrip(".:"))
        if p.exists():
            paths.append(p)
    files: list[Path] = []
    for p in paths:
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [{"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in dict.fromkeys(files)]


def check_data_root(cfg: RunConfig) -> None:
    """``ValueError`` if ``cfg.data_root`` is given but is not a folder (the data search would
    otherwise fall back to ``$DSBP_DATA`` and the other defaults without a word)."""
    if cfg.data_root is not None and not Path(cfg.data_root).is_dir():
        raise ValueError(f"data_root {cfg.data_root!r} is not a folder (it does not exist); "
                         "give a folder that holds the data files, or leave --data-root out "
                         "to use the default search")


def environment(device: torch.device) -> dict[str, Any]:
    """The facts that identify where and with what a run was made."""
    import dsbp

    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "world_size": world()[1],
        "dsbp": dsbp.__version__,
        **git_commit(),
        **compute_info(),  # CPU vector units and BLAS: CPU results depend on them
        "argv": sys.argv,
    }


# ----------------------------------------------------------------------------- processes
# Methods whose update is a function of the (DDP-averaged) gradient alone, so that N ranks on
# slices of the global batch step like one process on all of it. SAM qualifies: DDP averages
# both of its backward passes. Not listed (ValueError under --nproc > 1): lora (untested under
# DDP), dom_sgd / bulk_sgd / interp_sgd (each rank would take its Hessian basis on its own
# slice, so the ranks' weights would drift apart), and methods registered by plugins.
DDP_METHODS = frozenset({"sgd", "adamw", "sam", "dsbp", "dsbp_input", "dsbp_tuned"})
# Under FSDP2 (sharding='fsdp2') the same minus SAM (its perturbation was not checked on
# DTensor gradients).
FSDP_METHODS = DDP_METHODS - {"sam"}


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return world()[0] == 0


def barrier() -> None:
    """``dist.barrier()`` when more than one rank runs; nothing otherwise."""
    if world()[1] > 1:
        dist.barrier()


def check_ddp(cfg: RunConfig, world_size: int) -> None:
    """Raise ``ValueError`` if ``cfg`` cannot run on ``world_size`` data-parallel ranks.

    Checked: the method is in :data:`DDP_METHODS`, ``batch_size`` is divisible by
    ``world_size`` (each rank takes ``batch_size / world_size`` examples of every global
    batch), and no diagnostics are tracked (the trackers are single-process code).
    The last, shorter batch of an epoch is checked by :class:`RankShard` once the data is known.
    """
    if world_size == 1:
        return
    if cfg.method not in DDP_METHODS:
        raise ValueError(f"method {cfg.method!r} is not supported with --nproc {world_size}; "
                         f"supported: {sorted(DDP_METHODS)} (see docs/distributed.md)")
    if cfg.sharding == "fsdp2" and cfg.method not in FSDP_METHODS:
        raise ValueError(f"method {cfg.method!r} is not supported with sharding='fsdp2'; "
                         f"supported: {', '.join(sorted(FSDP_METHODS))}")
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by --nproc "
                         f"{world_size}: every rank takes an equal slice of each global batch")
    if cfg.track:
        raise ValueError(f"--track {','.join(cfg.track)} is not supported with --nproc "
                         f"{world_size}; run the diagnostics with --nproc 1")


class RankShard:
    """Rank ``rank``'s contiguous slice of every global batch of ``loader`` [ours].

    Every rank holds the same seeded loader, so the global batch ``(B, ...)`` of each step is
    the one a single process would see; rank r keeps rows ``[r B/W, (r+1) B/W)``. The DDP
    average of the ranks' mean-loss gradients is then the global batch's mean-loss gradient.

    Args:
        loader: a loader with ``__len__`` and ``iter_epoch(epoch, start_batch)`` (a
            :class:`~dsbp.data.loader.DeviceLoader`).
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks W.

    Raises (from :meth:`iter_epoch`):
        ValueError: a batch (e.g. the last, shorter one) whose size W does not divide.
    """

    def __init__(self, loader: Any, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __len__(self) -> int:
        return len(self.loader)

    def iter_epoch(self, epoch: int, start_batch: int = 0):
        """Yield this rank's ``(x, y)`` slice of each global batch from ``start_batch`` on."""
        for x, y in self.loader.iter_epoch(epoch, start_batch=start_batch):
            n, rem = divmod(y.shape[0], self.world_size)
            if rem:
                raise ValueError(
                    f"a batch of {y.shape[0]} examples cannot be split evenly over "
                    f"{self.world_size} processes (the last batch of an epoch holds "
                    "n_train % batch_size examples); choose --subset or --batch-size so that "
                    "it divides")
            sl = slice(self.rank * n, (self.rank + 1) * n)
            yield x[sl], y[sl]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (else ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# ------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every global RNG the run may touch, as tensors and plain numbers (weights_only-safe)."""
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------ runs
@dataclass
class RunResult:
    """What a finished (or stopped) run reports; also the content of ``result.json``.

    Attributes:
        status: ``ok``, ``diverged`` or ``error``.
        test_acc: test accuracy (fraction) of the last evaluation, NaN if none.
        test_loss: test cross-entropy of the last evaluation, NaN if none.
        wall_s: training seconds (excluding evaluation and checkpoints).
        epochs_done: completed epochs.
        steps: optimizer steps taken.
        message: why the run stopped early (empty when ok).
        device_name: the device the run trained on.
    """

    status: str
    test_acc: float
    test_loss: float
    wall_s: float
    epochs_done: int
    steps: int
    message: str = ""
    device_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (the content of ``result.json``)."""
        return dict(self.__dict__)


# Statuses of a run whose record is final: never rewritten by a later command.
FINISHED = ("ok", "diverged")


def read_result(run_dir: str | Path) -> RunResult | None:
    """The ``result.json`` of ``run_dir``, or None if the run has not finished.

    Raises:
        CorruptFileError: ``result.json`` is unreadable (the message names it).
    """
    p = Path(run_dir) / "result.json"
    if not p.exists():
        return None
    d = atomic.read_json(p)
    try:
        return RunResult(**d)
    except TypeError as err:
        raise atomic.CorruptFileError(f"{p} is not a run result ({err})") from None


def config_diff(saved: RunConfig, requested: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, requested value)}`` for every setting that differs (config
    fields, and ``method_kwargs`` / ``model_kwargs`` entries by name)."""
    a, b = saved.to_dict(), requested.to_dict()
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(a) | set(b)):
        if k in ("method_kwargs", "model_kwargs"):
            ka, kb = a.get(k) or {}, b.get(k) or {}
            for kk in sorted(set(ka) | set(kb)):
                if ka.get(kk, "(unset)") != kb.get(kk, "(unset)"):
                    out[f"{k}.{kk}"] = (ka.get(kk, "(unset)"), kb.get(kk, "(unset)"))
        elif a.get(k) != b.get(k):
            out[k] = (a.get(k), b.get(k))
    return out


def describe_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    """``"lr: saved 0.05, requested 0.1; ..."``."""
    return "; ".join(f"{k}: saved {a!r}, requested {b!r}" for k, (a, b) in diff.items())


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A run's ``checkpoint.pt`` (tensors and plain values only: ``weights_only=True``).

    Raises:
        CorruptFileError: the file cannot be read or is not a checkpoint of this format (the
            message names the file; torch's advice to load it unsafely is not passed on).
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise atomic.CorruptFileError(
            f"{path} is corrupt or not a dsbp checkpoint ({type(err).__name__}: {first}); "
            "move it away to restart the run from scratch") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise atomic.CorruptFileError(f"{path}: checkpoint format {fmt!r}, expected "
                                      f"{CHECKPOINT_FORMAT}")
    return ckpt


def write_error(run_dir: str | Path, cfg: RunConfig, err: BaseException, tb: str) -> RunResult:
    """Record a run that raised: status ``error`` in ``result.json``, a status record in
    ``metrics.jsonl`` (appended to what is there) and the traceback in ``error.txt``.

    A run whose ``result.json`` is final (:data:`FINISHED`) is never rewritten: its result is
    returned as it is. Files that cannot be read (a corrupt ``config.json`` or
    ``metrics.jsonl``) are left as they are.
    """
    run_dir = Path(run_dir)
    message = f"{type(err).__name__}: {err}"
    try:
        done = read_result(run_dir)
    except atomic.CorruptFileError:
        done = None
    if done is not None and done.status in FINISHED:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.json").exists():
        atomic.write_text(run_dir / "config.json", cfg.to_json() + "\n")
    mpath = run_dir / "metrics.jsonl"
    try:
        records = atomic.read_jsonl(mpath) if mpath.exists() else []
    except atomic.CorruptFileError:
        records = None  # kept as it is: the evidence of what went wrong
    if records is not None:
        records.append({"kind": "status", "status": "error", "message": message})
        atomic.write_jsonl(mpath, records)
    atomic.write_text(run_dir / "error.txt", tb)
    res = _result_from(records or [], "error", message, "")
    atomic.write_json(run_dir / "result.json", res.to_dict())
    return res


def _result_from(records: list[dict[str, Any]], status: str, message: str, dev: str) -> RunResult:
    evals = [r for r in records if r.get("kind") == "eval"]
    timed = [r for r in records if "wall_s" in r]
    last = evals[-1] if evals else {}
    steps = [r["step"] for r in records if "step" in r]
    return RunResult(
        status=status,
        test_acc=float(last.get("test_acc", float("nan"))),
        test_loss=float(last.get("test_loss", float("nan"))),
        wall_s=float(timed[-1]["wall_s"]) if timed else 0.0,
        epochs_done=int(last.get("epoch", 0)),
        steps=int(max(steps)) if steps else 0,
        message=message,
        device_name=dev,
    )


def run(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    dataset: Any | None = None,
    callbacks: Iterable[Callable[[TrainState], None]] = (),
    desc: str | None = None,
) -> RunResult:
    """Train one run into ``run_dir`` (created) and return its result.

    Args:
        cfg: the run's configuration.
        run_dir: the run directory.
        resume: continue from ``run_dir/checkpoint.pt`` if there is one; a finished run
            (``result.json`` present) is returned as is. Without ``resume`` an existing
            run directory with a ``config.json`` is an error (nothing is overwritten).
        progress: show a tqdm bar.
        dataset: an already loaded ``ImageDataset`` for ``cfg.dataset`` (a sweep loads each
            data set once).
        callbacks: called with the :class:`~dsbp.experiments.loop.TrainState` after every step.
        desc: progress-bar label (default: the directory name).

    Under a process group of W > 1 ranks every rank must call this with the same arguments:
    each trains on its slice of every global batch (:class:`RankShard`) with the model in
    ``DistributedDataParallel`` (BatchNorm synchronised on CUDA only), and only rank 0 writes
    files and shows a progress bar. Checkpoints hold the unwrapped model, so a run can be
    resumed with another number of processes.

    Returns:
        The :class:`RunResult` also written to ``result.json`` (on every rank).

    Raises:
        FileExistsError: ``run_dir`` holds a run and ``resume`` is False.
        ValueError: ``resume`` with a ``config.json`` that differs from ``cfg`` (the differing
            keys are named; nothing is written); bad settings; a ``data_root`` that is not a
            folder.
        CorruptFileError: an unreadable ``config.json``, ``result.json``, ``metrics.jsonl``
            or ``checkpoint.pt`` (named in the message).
    """
    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "config.json", run_dir / "checkpoint.pt"
    metrics_path, env_path = run_dir / "metrics.jsonl", run_dir / "env.json"
    if cfg_path.exists():
        if not resume:
            raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) "
                                  "to continue it or choose another output folder")
        saved = load_config(run_dir)
        diff = config_diff(saved, cfg)
        if diff:
            raise ValueError(f"cannot resume {run_dir}: its config.json differs from the "
                             f"requested config in {describe_diff(diff)}")
        done = read_result(run_dir)
        if done is not None and done.status in FINISHED:
            return done
    check_data_root(cfg)
    rank, world_size = world()
    check_ddp(cfg, world_size)
    device = resolve_device(cfg.device)
    if world_size > 1 and device.type == "cuda":
        # [ours] one GPU per rank: the one the launcher selected (launch / torchrun's
        # LOCAL_RANK), whatever index the config names
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' on the CPU")
    if dataset is None:
        from dsbp.data import load_dataset

        dataset = load_dataset(cfg.dataset, root=cfg.data_root)
    barrier()  # every rank has checked run_dir before rank 0 writes into it
    env = environment(device)
    env["sharding"] = cfg.sharding if world_size > 1 else "none"
    env["data"] = {"dataset": cfg.dataset, "data_root": cfg.data_root,
                   "source": str(getattr(dataset, "source", "")), "files": data_files(dataset)}
    if is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)
        if env_path.exists() and ckpt_path.exists():
            try:
                first = atomic.read_json(env_path)
            except atomic.CorruptFileError:  # provenance only: start a new record
                first = {"corrupt_env_replaced": True, **env}
            first.setdefault("resumes", []).append(env)
            env = first
        atomic.write_text(cfg_path, cfg.to_json() + "\n")
        atomic.write_json(env_path, env)

    # ---- build: data, model (seeded init), method, schedule; then seed the training RNGs
    data = load_data(cfg, device, dataset)
    if world_size > 1:
        last = data.n_train % cfg.batch_size
        if last % world_size:
            raise ValueError(f"the last batch of each epoch holds {last} examples "
                             f"({data.n_train} % {cfg.batch_size}), not divisible by --nproc "
                             f"{world_size}; choose --subset or --batch-size so that it is")
        data = dataclasses.replace(data, train=RankShard(data.train, rank, world_size))
    model = build_model_for(cfg, data).to(device)
    if device.type == "cuda" and data.test.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    if world_size > 1 and device.type == "cuda":  # SyncBatchNorm needs CUDA (torch 2.13)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sharded = world_size > 1 and cfg.sharding == "fsdp2"
    if sharded:  # FSDP2 before the optimizer is built: it sees the DTensor parameters
        from dsbp.optim.distributed import shard_model

        shard_model(model)
    loss_fn = build_loss(cfg)
    method = build_method(model, cfg, BuildContext(loss_fn=loss_fn, train=data.train,
                                                   device=device, num_classes=data.num_classes))
    if cfg.amp == "fp16" and method.closure_step:
        method.close()
        raise ValueError(f"amp='fp16' is not supported for {cfg.method!r} (closure step); "
                         "use amp='bf16'")
    if world_size > 1 and not sharded:  # gradients averaged over ranks (SAM: both passes)
        from torch.nn.parallel import DistributedDataParallel

        method.model = DistributedDataParallel(
            method.model, device_ids=[device.index] if device.type == "cuda" else None)
    scheduler = build_schedule(method.optimizer, cfg, len(data.train))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    trackers = build_trackers(cfg.track, cfg)
    seed_everything(cfg.seed)

    state = TrainState()
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        unwrap(method.model).load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt["method"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["state"])
        # metrics.jsonl may hold records written after this checkpoint: keep exactly its own.
        state.records = atomic.read_jsonl(metrics_path)[: ckpt["n_records"]]
        set_rng_state(ckpt["rng"])

    def save(st: TrainState) -> None:
        if not is_writer():
            return
        atomic.write_jsonl(metrics_path, st.records)
        if sharded:  # rank 0 holds only its shards: no checkpoint (a resumed run restarts)
            return
        atomic.torch_save(ckpt_path, {
            "format": CHECKPOINT_FORMAT,
            "model": unwrap(method.model).state_dict(),
            "method": method.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": st.scalars(),
            "n_records": len(st.records),
            "rng": rng_state(),
        })

    try:
        outcome = train(cfg, method=method, scheduler=scheduler, data=data, loss_fn=loss_fn,
                        state=state, device=device, save=save, trackers=trackers,
                        callbacks=callbacks, scaler=scaler, progress=progress and is_writer(),
                        desc=desc if desc is not None else run_dir.name)
    finally:
        method.close()
    result = _result_from(state.records, outcome.status, outcome.message, env["device_name"])
    if is_writer():
        atomic.write_jsonl(metrics_path, state.records)
        atomic.write_json(run_dir / "result.json", result.to_dict())
    return result


def load_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` saved in ``run_dir/config.json``.

    Raises:
        CorruptFileError: the file is not valid JSON or not a valid config (named).
    """
    path = Path(run_dir) / "config.json"
    d = atomic.read_json(path)
    try:
        return RunConfig.from_dict(d)
    except (TypeError, ValueError) as err:
        raise atomic.CorruptFileError(f"{path} is not a valid run config ({err})") from None


__all__ = ["RunResult", "load_config", "read_result", "run", "write_error", "environment",
           "FINISHED", "config_diff", "describe_diff", "load_checkpoint", "data_files",
           "check_data_root", "file_sha256",
           "DDP_METHODS", "FSDP_METHODS", "RankShard", "barrier", "check_ddp", "is_writer",
           "unwrap", "world",
           "git_commit", "device_name", "rng_state", "set_rng_state", "seed_everything"]
