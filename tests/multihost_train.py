r"""One process of a small multi-process training run (tests and tests/multihost_trials.py).

    launch/local_cluster.sh -n 2 -d 2 -- python -m tests.multihost_train \
        --workdir=/tmp/mh --data_root=/tmp/mh_data --steps=6 --out=/tmp/mh/params.npz

Trains the demo recipe shrunk by tests/train_utils.tiny_config (56 px crops, an
8-wide Swin) on a small generated manifest data set through the real
`train.train_and_evaluate`, after joining the cluster with
`hyperiqa_jax.distributed.initialize()` (settings from the JAX_* environment
that local_cluster.sh sets). Rerunning with the same workdir resumes.

--emulate_processes=P makes a single process read exactly the global batches of
a P-process run (the P per-process pipelines, concatenated in process order),
so a 1-process run can be compared bit-for-bit in data with a P-process run.
`read_state(workdir)` reads the final state back for comparisons.
"""

import argparse
import os
import sys

import numpy as np


def emulated_pipeline(make, processes):
    """make_train_dataset as seen by `processes` hosts, glued into one global stream."""
    import grain

    def make_train_dataset(records, data_config, *, batch_size, seed, process_index=0,
                           process_count=1):
        assert process_count == 1, "emulation is for single-process runs"
        parts = [make(records, data_config, batch_size=batch_size // processes, seed=seed,
                      process_index=i, process_count=processes) for i in range(processes)]
        zipped = grain.experimental.ZipIterDataset(parts)
        return zipped.map(lambda group: {k: np.concatenate([g[k] for g in group])
                                         for k in group[0]})
    return make_train_dataset


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_root", required=True, help="created on first use")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--checkpoint_every", type=int, default=1000)
    parser.add_argument("--emulate_processes", type=int, default=0)
    parser.add_argument("--stop_check_every", type=int, default=2,
                        help="train.stop_check_every_steps: processes agree on SIGTERM every N")
    parser.add_argument("--step_sleep", type=float, default=0.0,
                        help="seconds to sleep before each step (widens kill windows)")
    args = parser.parse_args(argv)

    from hyperiqa_jax import distributed
    distributed.initialize()  # before anything touches a device

    import jax

    from hyperiqa_jax import data, train
    from tests import train_utils

    if args.emulate_processes > 1:
        data.make_train_dataset = emulated_pipeline(data.make_train_dataset,
                                                    args.emulate_processes)
    if args.step_sleep:
        import time
        step_fn = train.compile_steps

        def slow_compile(*a, **kw):
            train_fn, eval_fn, shardings = step_fn(*a, **kw)

            def slow_train(state, batch):
                time.sleep(args.step_sleep)
                return train_fn(state, batch)
            return slow_train, eval_fn, shardings
        train.compile_steps = slow_compile

    if jax.process_index() == 0 and not os.path.exists(os.path.join(args.data_root,
                                                                    "manifest.csv")):
        train_utils.write_manifest_dataset(args.data_root, n_train=16, n_test=8)
    if jax.process_count() > 1:  # everyone waits for the data set process 0 wrote
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("data written")

    config = train_utils.tiny_config(root=args.data_root, name="manifest")
    with config.unlocked():
        config.train.batch_size = args.batch_size
        config.train.eval_batch_size = args.batch_size
        config.train.max_steps = args.steps
        config.train.checkpoint_every_steps = args.checkpoint_every
        config.train.keep_checkpoints = 3
        config.train.stop_check_every_steps = args.stop_check_every
        config.data.num_workers = 1
    summary = train.train_and_evaluate(config, args.workdir)

    print(f"stop_reason: {summary['stop_reason']} step {summary['step']}", flush=True)
    return 0


def read_state(workdir, step=None):
    """{path: numpy array} of a checkpoint's train state, read by one process on one device."""
    from pathlib import Path

    import jax
    import orbax.checkpoint as ocp

    from hyperiqa_jax import checkpointing
    directory = Path(workdir) / checkpointing.LATEST_DIR
    options = ocp.CheckpointManagerOptions(read_only=True)
    handlers = {"state": ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers, options=options) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            return None, {}
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              m.item_metadata(step).state)
        state = m.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
    return step, {jax.tree_util.keystr(k): np.asarray(v)
                  for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def compare_states(a, b):
    """(largest difference, largest difference on the attention key biases) of two states.

    The key third of each qkv bias has an exactly zero true gradient (softmax is
    invariant to adding q.b_k to every logit of a row), so its gradients are
    rounding noise that Adam scales up to learning-rate-sized steps: those entries
    (and their Adam moments) are reported apart and only their parameters are
    compared, loosely.
    """
    assert a.keys() == b.keys(), set(a) ^ set(b)
    worst, worst_key_bias = 0.0, 0.0
    for key in a:
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        assert x.shape == y.shape, key
        # Relative to the values' size, floored so that near-zero entries count absolutely.
        diff = np.abs(x - y) / np.maximum(np.abs(y), 1e-2)
        if "['qkv']['bias']" in key:
            third = x.shape[-1] // 3
            if key.startswith("['params']"):
                key_part = np.abs(x - y)[..., third:2 * third]
                worst_key_bias = max(worst_key_bias, float(key_part.max()))
            diff[..., third:2 * third] = 0
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst, worst_key_bias


if __name__ == "__main__":
    sys.exit(main())
