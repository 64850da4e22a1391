"""One process of a loopback cluster for tests/test_distributed.py.

Joins the job through hyperiqa_jax.distributed.initialize() (settings from the
JAX_* environment), then checks cross-process collectives on a global mesh:
a jitted sum of a batch assembled with make_array_from_process_local_data and a
psum under shard_map. Prints one JSON line with what it saw.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hyperiqa_jax import distributed


def main():
    info = distributed.initialize()
    again = distributed.initialize()  # must return at once, same view
    assert again["process_count"] == info["process_count"], (info, again)

    n_dev = jax.device_count()
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.local_device_count()
    # Global rows 0..n_dev-1, each process holding its own consecutive block.
    local = np.arange(rows, dtype=np.float32) + rows * jax.process_index()
    batch = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(batch)

    psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))(batch)
    print(json.dumps({**info, "sum": float(total), "psum": np.asarray(psum).tolist(),
                      "global_shape": list(batch.shape)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
