"""Command line: `python -m dynnet_ext {train,bench,info}` (also installed as `dynnet-ext`).

train  the seed's training (N=64, D_in=1000, H=100, D_out=10, Adam lr 1e-4,
       MSELoss(reduction='sum'), 100 epochs) on fused layers, CPU by default; Adam runs
       as torch's fused kernel (Adam(fused=True)) where the running torch has one for the
       device, --optimizer adam builds it as the seed does
bench  fused vs stock PyTorch vs torch.compile (see benchmarks/README.md)
info   what was compiled and what this machine has
"""

import argparse
import contextlib
import functools
import os
import random
import statistics
import sys
import time

import torch

SEED_SHAPE = {"N": 64, "D_in": 1000, "H": 100, "D_out": 10}


def build_model(impl, D_in, H, D_out, device):
    from . import models, reference

    if impl == "stock":
        return reference.DynamicNet(D_in, H, D_out, device=device)
    return models.DynamicNet(D_in, H, D_out, device=device, fusion="network" if impl == "fused" else "layer")


# "adam": torch.optim.Adam(params, lr) as the seed builds it (torch's default implementation);
# "adam-fused": Adam(params, lr, fused=True), the same update in one kernel over all parameters.
OPTIMIZERS = ("adam", "adam-fused")
SEED_OPTIMIZER = "adam"
DTYPES = ("float32", "bfloat16")


@functools.cache
def _fused_adam_problem(device_type):
    """None when the running torch steps Adam(fused=True) on this device type, else its error.
    Probed by one step on a one-element parameter rather than read from torch's version: which
    devices have a fused kernel is torch's to change between releases."""
    p = torch.zeros(1, device=device_type, requires_grad=True)
    p.grad = torch.ones_like(p)
    try:
        torch.optim.Adam([p], fused=True).step()
    except (RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def choose_optimizer(name, device):
    """The optimizer (one of OPTIMIZERS) to train with on `device`: `name`, checked, or for
    None the fastest this torch supports there ("adam-fused" where it has the kernel, else
    "adam")."""
    if name is not None and name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    problem = _fused_adam_problem(torch.device(device).type) if name != "adam" else None
    if name is None:
        return "adam" if problem else "adam-fused"
    if problem:
        raise ValueError(f"torch {torch.__version__} cannot run Adam(fused=True) on {device} ({problem}): "
                         "use the seed's Adam ('adam')")
    return name


def make_optimizer(name, params, lr):
    """torch.optim.Adam over `params` as `name` (one of OPTIMIZERS) says."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return torch.optim.Adam(params, lr=lr, fused=True) if name == "adam-fused" else torch.optim.Adam(params, lr=lr)


FSDP_WRAPS = ("layers", "root")


def shard_fsdp(model, device, wrap="layers", param_dtype=None):
    """FSDP2 over all processes: wrap="layers" is the per-module recipe (fully_shard each layer,
    then the root), wrap="root" shards only the root. param_dtype (e.g. torch.bfloat16) computes
    with parameters in that dtype and reduces gradients in float32 (MixedPrecisionPolicy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if wrap not in FSDP_WRAPS:
        raise ValueError(f"fsdp_wrap must be one of {FSDP_WRAPS}, got {wrap!r}")
    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    if wrap == "layers":
        for layer in (model.input_layer, model.hidden_layer, model.output_layer):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def train(epochs=100, device="cpu", seed=0, impl="fused", lr=1e-4, N=64, D_in=1000, H=100, D_out=10,
          log=None, ddp=False, fsdp=False, fsdp_wrap="layers", param_dtype=None, on_step=None,
          return_model=False, optimizer=None, dtype="float32", phase_seconds=None):
    """The seed's training loop. Returns (losses, step_seconds, depths[, model]).

    Data, weights and depths come from `seed` in the seed's order (inputs, labels, model), so
    impl='fused' and impl='stock' see identical numbers. `log(epoch, loss, depth)` is called
    after each step, `on_step(model, pred)` too (tests read the gradients there).

    optimizer: one of OPTIMIZERS, or None for "adam-fused" where this torch runs it on `device`
    and "adam" (the seed's) elsewhere (choose_optimizer). dtype: "float32" (the seed's) or
    "bfloat16": forward and loss under torch.autocast(bfloat16) over float32 parameters, the
    loss computed in float32. phase_seconds, a dict, receives per step the seconds of the
    "forward" (model and loss), "backward" and "optimizer" (zero_grad and step) phases, each a
    list (CUDA: measured with events on the stream, so they are the device's times).

    ddp=True or fsdp=True trains under torch.distributed (start with torchrun; gloo on CPU, NCCL
    on CUDA): every rank makes the same data and weights, trains on its 1/world_size slice of
    the batch, and gets the same depth as rank 0 (broadcast each step, so all ranks run the
    same graph). ddp wraps the model in DistributedDataParallel; fsdp shards it with FSDP2
    (shard_fsdp: fsdp_wrap and param_dtype as there). The loss is a sum over the batch, so each
    rank's loss is scaled by world_size before backward: both average gradients over ranks,
    and the average of world_size * (slice gradient) is the full-batch gradient. Parameters thus
    follow single-process training on the whole batch; the reported loss is the full batch's
    (summed over ranks).
    """
    if ddp and fsdp:
        raise ValueError("ddp and fsdp are two ways to train data-parallel: choose one")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    torch.manual_seed(seed)
    random.seed(seed)
    x = torch.randn(N, D_in)
    label = torch.randn(N, D_out)
    distributed = ddp or fsdp
    world, rank = 1, 0
    if distributed:
        import torch.distributed as dist

        if str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        if N % world:
            raise ValueError(f"the batch N={N} must divide evenly over {world} processes")
        x, label = x.chunk(world)[rank], label.chunk(world)[rank]
    x, label = x.to(device), label.to(device)
    model = build_model(impl, D_in, H, D_out, device)
    net = model
    if ddp:
        # find_unused_parameters: at depth 0 the hidden layer gets no gradient.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if str(device).startswith("cuda") else None,
            find_unused_parameters=True)
    elif fsdp:
        shard_fsdp(model, device, fsdp_wrap, param_dtype)  # in place: model's parameters become shards
    loss_fn = torch.nn.MSELoss(reduction="sum")
    opt = make_optimizer(choose_optimizer(optimizer, device), model.parameters(), lr)
    precision = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bfloat16"
                 else contextlib.nullcontext())
    mark, seconds = _phase_clock(device)
    phases = {"forward": [], "backward": [], "optimizer": []}
    losses, times, depths = [], [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        depth = random.randint(0, 3)
        if distributed:
            drawn = torch.tensor([depth], device=device)
            dist.broadcast(drawn, src=0)  # every rank must run the same graph
            depth = int(drawn.item())
        m0 = mark()
        with precision:
            pred = net(x, depth)
            loss = loss_fn(pred.to(label.dtype), label)  # a mixed-precision pred: the loss in float32
        m1 = mark()
        opt.zero_grad(set_to_none=True)
        m2 = mark()
        (loss * world if distributed else loss).backward()
        m3 = mark()
        opt.step()
        m4 = mark()
        if distributed:
            loss = loss.detach().clone()
            dist.all_reduce(loss)  # the full batch's loss
        value = loss.item()  # synchronises, so the step time below is complete
        times.append(time.perf_counter() - t0)
        phases["forward"].append(seconds(m0, m1))
        phases["backward"].append(seconds(m2, m3))
        phases["optimizer"].append(seconds(m1, m2) + seconds(m3, m4))
        losses.append(value)
        depths.append(depth)
        if log:
            log(epoch, value, depth)
        if on_step:
            on_step(model, pred)
    if phase_seconds is not None:
        phase_seconds.update(phases)
    return (losses, times, depths, model) if return_model else (losses, times, depths)


def _phase_clock(device):
    """(mark, seconds): mark() notes a point of the step, seconds(a, b) the time between two
    marks once the step has synchronised. The host clock on the CPU; on CUDA events recorded on
    the stream, since the host only queues the kernels there."""
    if torch.device(device).type != "cuda":
        return time.perf_counter, lambda a, b: b - a

    def mark():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    return mark, lambda a, b: a.elapsed_time(b) / 1e3


def _cmd_train(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"dynnet_ext train: --device {args.device} asked for, but torch sees no CUDA GPU")
    if args.epochs < 1:
        sys.exit("dynnet_ext train: --epochs must be at least 1")
    if args.ddp and args.fsdp:
        sys.exit("dynnet_ext train: --ddp and --fsdp are two ways to train data-parallel: choose one")
    if not args.fsdp and (args.fsdp_wrap or args.fsdp_param_dtype):
        sys.exit("dynnet_ext train: --fsdp-wrap and --fsdp-param-dtype go with --fsdp")
    distributed = args.ddp or args.fsdp
    if distributed and "RANK" not in os.environ:
        flag = "--ddp" if args.ddp else "--fsdp"
        sys.exit(f"dynnet_ext train: {flag} runs under torchrun, e.g. "
                 f"torchrun --nproc_per_node=2 -m dynnet_ext train {flag}")
    reporting = int(os.environ.get("RANK", "0")) == 0 if distributed else True  # rank 0 speaks for all
    say = print if reporting else (lambda *a, **k: None)
    width, bar = len(str(args.epochs)), 20

    def log(epoch, loss, depth):
        done = (epoch + 1) * bar // args.epochs
        say(f"[{'#' * done}{'.' * (bar - done)}] epoch {epoch + 1:>{width}}/{args.epochs} "
            f"depth {depth} loss {loss}", flush=True)

    param_dtype = getattr(torch, args.fsdp_param_dtype) if args.fsdp_param_dtype else None
    wrap = args.fsdp_wrap or "layers"
    if args.ddp:
        parallel = f", DDP over {os.environ.get('WORLD_SIZE')} processes"
    elif args.fsdp:
        parallel = (f", FSDP2 over {os.environ.get('WORLD_SIZE')} processes, {wrap} sharded"
                    + (f", {args.fsdp_param_dtype} parameters" if param_dtype else ""))
    else:
        parallel = ""
    try:
        optimizer = choose_optimizer(args.optimizer, args.device)
    except ValueError as exc:
        sys.exit(f"dynnet_ext train: {exc}")
    how = (" (autocast over float32 parameters)" if args.dtype != "float32" else
           f" ({args.fsdp_param_dtype} parameters, FSDP mixed precision)" if param_dtype else "")
    say(f"dynnet_ext train: impl={args.impl} device={args.device} epochs={args.epochs} seed={args.seed} "
        f"N={args.N} D_in={args.D_in} H={args.H} D_out={args.D_out} optimizer={optimizer} dtype={args.dtype} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads{parallel})")
    from .ops import kernel_calls

    before, phases, computed = kernel_calls(), {}, set()
    losses, times, depths = train(args.epochs, args.device, args.seed, args.impl, args.lr,
                                  args.N, args.D_in, args.H, args.D_out, log=log, ddp=args.ddp, fsdp=args.fsdp,
                                  fsdp_wrap=wrap, param_dtype=param_dtype, optimizer=optimizer, dtype=args.dtype,
                                  phase_seconds=phases, on_step=lambda model, pred: computed.add(pred.dtype))
    after = kernel_calls()
    if distributed:
        torch.distributed.barrier()  # no rank tears its connections down while a peer still talks
        torch.distributed.destroy_process_group()
        global _left_process_group
        _left_process_group = True
    skip = 1 if len(times) > 1 else 0  # the first step pays one-off costs (allocations, lazy init)
    steady = times[skip:]
    phases["other"] = [t - f - b - o for t, f, b, o in zip(times, phases["forward"], phases["backward"],
                                                             phases["optimizer"])]
    breakdown = ", ".join(f"{name} {statistics.median(values[skip:]) * 1e3:.3f}" for name, values in phases.items())
    say(f"done: {args.epochs} steps in {sum(times):.3f} s; step time median "
        f"{statistics.median(steady) * 1e3:.3f} ms (min {min(steady) * 1e3:.3f} ms; medians per phase: "
        f"{breakdown} ms); loss {losses[0]:.4f} -> {losses[-1]:.4f}; depths 0/1/2/3 drawn "
        + "/".join(str(depths.count(d)) for d in range(4)) + " times")
    ran = [f"{device}.{op} x{after[device][op] - before[device][op]}"
           for device in after for op in after[device] if after[device][op] > before[device][op]]
    say("dynnet kernels run: " + (", ".join(ran) if ran else "none (stock PyTorch computed everything)")
        + f"; the network computed in {', '.join(str(d).removeprefix('torch.') for d in computed)}{how}; "
        f"optimizer {optimizer}")
    return 0


def _cmd_info(args):
    from . import ops

    print(f"dynnet_ext {__import__('dynnet_ext').__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), {torch.get_num_threads()} CPU threads")
    if ops.LOAD_ERROR is not None:
        print(f"compiled kernels: NOT LOADED ({ops.LOAD_ERROR}); everything runs on stock PyTorch")
    else:
        info = ops.BUILD_INFO
        print(f"compiled against torch {info['torch_version']}")
        print(f"CPU kernels: {'yes' if info['cpu_kernels'] else 'no'}")
        archs = f" (archs {info['cuda_archs']})" if info["cuda_kernels"] else ""
        print(f"CUDA kernels: {'yes' if info['cuda_kernels'] else 'no'}{archs}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("GPU: none visible")
    return 0


def _cmd_bench(args):
    from . import bench

    return bench.run(args)


def make_parser():
    parser = argparse.ArgumentParser(prog="python -m dynnet_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the seed's DynamicNet (fused layers, CPU by default)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seeds torch and Python's random (data, weights, depths)")
    p.add_argument("--impl", choices=["fused", "fused-layer", "stock"], default="fused",
                   help="fused: dynnet_ext.DynamicNet (the whole network in one fused op); fused-layer: "
                        "one fused op per layer; stock: nn.Linear + nn.ReLU as in the seed")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ddp", action="store_true",
                   help="data-parallel over the processes torchrun starts (gloo on CPU, NCCL on CUDA)")
    p.add_argument("--fsdp", action="store_true",
                   help="sharded data-parallel (FSDP2 fully_shard) over the processes torchrun starts "
                        "(gloo on CPU, NCCL on CUDA)")
    p.add_argument("--fsdp-wrap", choices=FSDP_WRAPS,
                   help="layers (default): fully_shard each layer, then the root (FSDP's per-module recipe); "
                        "root: the root only")
    p.add_argument("--fsdp-param-dtype", choices=["bfloat16", "float16"],
                   help="FSDP mixed precision: compute with parameters in this dtype, reduce gradients in float32")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="adam-fused: torch.optim.Adam(fused=True), the default where the running torch has the "
                        "kernel for the device; adam: Adam as the seed builds it (the default elsewhere)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32 (the seed's); bfloat16: forward and loss under torch.autocast(bfloat16) "
                        "over float32 parameters (gradients and optimizer in float32)")
    for name, value in SEED_SHAPE.items():
        p.add_argument(f"--{name}", type=int, default=value)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("info", help="what was compiled and what this machine has")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="benchmark fused vs stock PyTorch vs torch.compile")
    from . import bench

    bench.add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    return args.func(args)


_left_process_group = False  # set by `train` under torchrun once its process group is destroyed


def run():
    """The entry point of `python -m dynnet_ext` and `dynnet-ext`: main(), then exit. A torchrun
    worker whose training finished and whose process group is destroyed leaves without the
    interpreter's teardown: torch's gloo transport can abort the process there ("terminate
    called without an active exception", seen now and then under load) after a complete,
    successful run, which would turn its exit code into a failure."""
    code = main()
    if _left_process_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
