r"""What a step compiles to on another platform, without that platform's device.

    python -m hyperiqa_jax.lowering --config=configs/base.py --dtype=bfloat16
    python -m hyperiqa_jax.lowering --config=configs/tiny.py --platforms=cpu,cuda,tpu
    python -m hyperiqa_jax.lowering --config=configs/base.py --dtype=bfloat16 \
        --kernels=generic --memory --batch=128 --remat=block

JAX lowers a function for any platform on any host
(`traced.lower(lowering_platforms=("cuda",))`), so the StableHLO a GPU or TPU
would compile can be inspected here. This counts the operations that stall an
accelerator: conditionals on a computed index (XLA:GPU copies the index to the
host and blocks the stream, and ends a CUDA graph there), loops, and host
callbacks. `jax.lax.platform_dependent` emits conditionals too, but on a
constant index, and only the lowered platform's branch, which XLA folds away;
those are not counted.

The steps are train.py's own (`trace_steps`: train.compile_steps on a `data`
mesh). `hyperiqa_jax.aot` compiles them further, with the TPU and GPU compilers.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
from absl import app, flags

from hyperiqa_jax import cli, config_checks

PLATFORMS = ("cpu", "cuda", "tpu")


@dataclasses.dataclass
class ControlFlow:
    """Counts of the operations in a lowered module that an accelerator cannot run inline."""

    conditionals: int = 0     # stablehlo.case with >= 2 branches on a computed index.
    loops: int = 0            # stablehlo.while.
    host_callbacks: int = 0   # custom calls into Python, send / recv.

    @property
    def total(self) -> int:
        return self.conditionals + self.loops + self.host_callbacks


def _is_constant(value) -> bool:
    owner = value.owner
    return hasattr(owner, "name") and owner.name == "stablehlo.constant"


def _walk(operation, counts: ControlFlow):
    for region in operation.regions:
        for block in region.blocks:
            for op in block.operations:
                name = op.operation.name
                if name == "stablehlo.case":
                    if len(op.operation.regions) >= 2 and not _is_constant(op.operands[0]):
                        counts.conditionals += 1
                elif name == "stablehlo.while":
                    counts.loops += 1
                elif name in ("stablehlo.send", "stablehlo.recv"):
                    counts.host_callbacks += 1
                elif name == "stablehlo.custom_call":
                    target = str(op.operation.attributes["call_target_name"])
                    if "callback" in target:
                        counts.host_callbacks += 1
                _walk(op.operation, counts)


def control_flow(lowered) -> ControlFlow:
    """ControlFlow of a `jax.stages.Lowered` (every function of its module)."""
    counts = ControlFlow()
    _walk(lowered.compiler_ir("stablehlo").operation, counts)
    return counts


# XLA:CPU expands the optimisation barriers that `jax.checkpoint` puts around a
# recomputation before common-subexpression elimination, which then merges the
# recomputation with the forward pass: a CPU compile shows no saving from remat.
# GPUs and TPUs keep the barriers until after scheduling; compiling without that
# one pass lets the CPU's buffer assignment show what remat saves.
KEEP_REMAT_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def memory_analysis(traced) -> dict:
    """GiB of a traced step compiled here: temporaries, arguments, outputs."""
    compiled = traced.lower().compile(compiler_options=KEEP_REMAT_BARRIERS)
    stats = compiled.memory_analysis()
    return {"temp_gib": stats.temp_size_in_bytes / 2**30,
            "argument_gib": stats.argument_size_in_bytes / 2**30,
            "output_gib": stats.output_size_in_bytes / 2**30}


def abstract_train_inputs(config, batch: int = 1, platform: str | None = None):
    """(model, tx, abstract state, abstract batch) for `train.train_step`, computing nothing.

    `platform` is where the step will run, which "auto" precision follows
    (models.compute_dtype); JAX's default backend unless given.
    """
    from hyperiqa_jax import models, optim, state

    model = models.build_model(config.model, platform)
    tx = optim.make_optimizer(config.train, steps_per_epoch=100)
    crop = config.data.crop_size
    train_state = jax.eval_shape(lambda: state.init_train_state(model, tx, crop,
                                                                jax.random.key(0)))
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.uint8),
                  "score": jax.ShapeDtypeStruct((batch,), jnp.float32),
                  "image_index": jax.ShapeDtypeStruct((batch,), jnp.int32),
                  "valid": jax.ShapeDtypeStruct((batch,), jnp.bool_)}
    return model, tx, train_state, batch_spec


def trace_steps(config, batch: int = 1, platform: str | None = None, mesh=None):
    """{'train': traced train step, 'eval': traced scoring step}, jitted as train.py jits them.

    `mesh` has train.py's one `data` axis (this host's first device unless given);
    `batch` is per device of it. "auto" precision follows `platform`.
    """
    from hyperiqa_jax import state, train

    mesh = mesh or jax.sharding.Mesh(jax.devices()[:1], ("data",))
    model, tx, train_state, batch_spec = abstract_train_inputs(config, batch * mesh.size,
                                                               platform)
    train_fn, eval_fn, shardings = train.compile_steps(model, tx, config, (0.0, 1.0), mesh,
                                                       train_state)

    def placed(tree, sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)

    train_batch = placed({k: batch_spec[k] for k in ("image", "score")}, shardings["batch"])
    eval_batch = placed({k: batch_spec[k] for k in ("image", "image_index", "valid")},
                        shardings["batch"])
    variables = placed(state.inference_variables(train_state), shardings["repl"])
    with jax.set_mesh(mesh):
        return {"train": train_fn.trace(train_state, train_batch),
                "eval": eval_fn.trace(variables, eval_batch)}


def define_flags(flag_values=flags.FLAGS):
    """The command's flags (defined when it runs, see hyperiqa_jax/cli.py)."""
    f = dict(flag_values=flag_values)
    flags.DEFINE_string("config", None, "A configs/*.py file (required).", **f)
    flags.DEFINE_string("dtype", "", "Override model.dtype (float32, bfloat16).", **f)
    flags.DEFINE_string("kernels", "", "Override model.kernels (auto, cpu, generic).", **f)
    flags.DEFINE_list("platforms", list(PLATFORMS), f"Platforms to lower for, comma-separated, "
                      f"from {', '.join(PLATFORMS)}.", **f)
    flags.DEFINE_string("remat", "", "Override model.remat (none, block).", **f)
    flags.DEFINE_bool("memory", False, "Instead: compile the train step here and print its "
                      "memory analysis as JSON (minutes for Swin-B).", **f)
    flags.DEFINE_integer("batch", 1, "Images per step (per device).", lower_bound=1, **f)


def main(argv, flag_values=flags.FLAGS) -> int:
    args = flag_values
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not args.config:
        raise app.UsageError("--config is required, e.g. --config=configs/base.py")
    platforms = [p for p in args.platforms if p]
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown:
        raise app.UsageError(f"--platforms: unknown platform(s) {unknown}; choose from "
                             f"{', '.join(PLATFORMS)}")
    config = config_checks.load_config_file(args.config)
    if args.dtype:
        config.model.dtype = args.dtype
    if args.kernels:
        config.model.kernels = args.kernels
    if args.remat:
        config.model.remat = args.remat
    if args.memory:
        stats = memory_analysis(trace_steps(config, args.batch)["train"])
        print(json.dumps({"config": args.config, "dtype": config.model.dtype,
                          "kernels": config.model.kernels, "remat": config.model.remat,
                          "batch": args.batch, **stats}))
        return 0
    for platform in platforms:  # "auto" precision differs per platform: one trace each
        for step, traced in trace_steps(config, args.batch, platform).items():
            counts = control_flow(traced.lower(lowering_platforms=(platform,)))
            print(f"{step:<5} {platform:<4} conditionals {counts.conditionals:4d}  "
                  f"loops {counts.loops:3d}  host callbacks {counts.host_callbacks:3d}")
    return 0


if __name__ == "__main__":
    cli.run(main, define_flags=define_flags)
